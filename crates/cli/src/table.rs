//! Plain-text tables and number formats for people: columns padded to their
//! widest cell, amounts right-aligned with thousands separators.

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

pub struct Table {
    columns: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(columns: &[(&'static str, Align)]) -> Table {
        Table { columns: columns.to_vec(), rows: Vec::new() }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.columns.len(), "a row has one cell per column");
        self.rows.push(cells);
    }

    /// The table, each line indented by `indent` spaces, with a trailing newline.
    pub fn render(&self, indent: usize) -> String {
        let widths: Vec<usize> = self
            .columns
            .iter()
            .enumerate()
            .map(|(index, (header, _))| {
                self.rows
                    .iter()
                    .map(|row| row[index].chars().count())
                    .chain([header.chars().count()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        let headers: Vec<String> = self.columns.iter().map(|(header, _)| (*header).to_owned()).collect();
        for cells in std::iter::once(&headers).chain(&self.rows) {
            let mut line = " ".repeat(indent);
            for (index, cell) in cells.iter().enumerate() {
                let width = widths[index];
                let padding = " ".repeat(width - cell.chars().count());
                match self.columns[index].1 {
                    Align::Left => {
                        line.push_str(cell);
                        line.push_str(&padding);
                    }
                    Align::Right => {
                        line.push_str(&padding);
                        line.push_str(cell);
                    }
                }
                line.push_str("  ");
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `1234567` → `1,234,567`; `-5000` → `-5,000`.
pub fn grouped(value: i64) -> String {
    let digits = value.unsigned_abs().to_string();
    let mut out = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    if value < 0 { format!("-{out}") } else { out }
}

/// A balance change: `+1,000`, `-300`, or empty for none.
pub fn signed(change: i64) -> String {
    match change {
        0 => String::new(),
        positive if positive > 0 => format!("+{}", grouped(positive)),
        negative => grouped(negative),
    }
}

/// Currencies whose minor unit is the unit itself (ISO 4217 exponent 0, as
/// Stripe lists them); every other currency has two decimals.
const ZERO_DECIMAL_CURRENCIES: [&str; 16] =
    ["BIF", "CLP", "DJF", "GNF", "JPY", "KMF", "KRW", "MGA", "PYG", "RWF", "UGX", "VND", "VUV", "XAF", "XOF", "XPF"];

/// Minor units as money: `5000` USD → `USD 50.00`, `5000` JPY → `JPY 5,000`.
pub fn money(minor_units: i64, currency: &str) -> String {
    if ZERO_DECIMAL_CURRENCIES.contains(&currency) {
        return format!("{currency} {}", grouped(minor_units));
    }
    let sign = if minor_units < 0 { "-" } else { "" };
    let absolute = minor_units.unsigned_abs();
    format!("{currency} {sign}{}.{:02}", grouped((absolute / 100) as i64), absolute % 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_like_a_ledger() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1_000), "1,000");
        assert_eq!(grouped(-1_234_567), "-1,234,567");
        assert_eq!(signed(300), "+300");
        assert_eq!(signed(-10_000), "-10,000");
        assert_eq!(signed(0), "");
        assert_eq!(money(5_000, "USD"), "USD 50.00");
        assert_eq!(money(-5, "EUR"), "EUR -0.05");
        assert_eq!(money(123_456_789, "USD"), "USD 1,234,567.89");
        assert_eq!(money(5_000, "JPY"), "JPY 5,000");
    }

    #[test]
    fn columns_are_padded_to_their_widest_cell() {
        let mut table = Table::new(&[("NAME", Align::Left), ("AMOUNT", Align::Right)]);
        table.row(vec!["a".to_owned(), "1,000".to_owned()]);
        table.row(vec!["longer".to_owned(), "5".to_owned()]);
        assert_eq!(table.render(2), "  NAME    AMOUNT\n  a        1,000\n  longer       5\n");
    }
}
