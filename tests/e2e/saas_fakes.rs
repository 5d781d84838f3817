//! Fakes of Airtable, Google Sheets and Salesforce on 127.0.0.1, for the
//! SaaS providers: services that cannot run here, faked at the edge of the
//! network from their documented shapes (`fixtures/saas/`, each file's
//! documentation page named in its PROVENANCE.md). Each fake keeps a log
//! of the requests it saw, and checks what the real service would: the
//! token, the JWT's signature and claims, the request rate.

use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A request as a fake saw it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub at: Instant,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(key, _)| key.eq_ignore_ascii_case(name)).map(|(_, value)| value.as_str())
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
    }

    pub fn form(&self) -> Vec<(String, String)> {
        form_urlencoded::parse(self.body.as_bytes()).into_owned().collect()
    }

    pub fn form_field(&self, name: &str) -> Option<String> {
        self.form().into_iter().find(|(key, _)| key == name).map(|(_, value)| value)
    }

    fn bearer(&self) -> Option<&str> {
        self.header("authorization")?.strip_prefix("Bearer ")
    }
}

pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

pub fn reply(status: u16, body: impl Into<String>) -> Reply {
    Reply { status, headers: Vec::new(), body: body.into() }
}

impl Reply {
    fn with(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }
}

pub fn fixture(path: &str) -> String {
    let full = format!("{}/fixtures/saas/{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&full).unwrap_or_else(|error| panic!("{full}: {error}"))
}

type Handler = dyn Fn(&Request) -> Reply + Send + Sync;

/// Serves `handler` on 127.0.0.1 (one thread a connection, one request a
/// connection); every request is logged before it is answered.
fn serve(handler: Arc<Handler>, log: Arc<Mutex<Vec<Request>>>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (handler, log) = (handler.clone(), log.clone());
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                let mut parts = line.split_whitespace();
                let method = parts.next().unwrap_or_default().to_owned();
                let target = parts.next().unwrap_or("/").to_owned();
                let mut headers = Vec::new();
                loop {
                    let mut header = String::new();
                    if reader.read_line(&mut header).unwrap_or(0) == 0 || header.trim().is_empty() {
                        break;
                    }
                    if let Some((name, value)) = header.split_once(':') {
                        headers.push((name.trim().to_owned(), value.trim().to_owned()));
                    }
                }
                let length = headers
                    .iter()
                    .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
                    .and_then(|(_, value)| value.parse::<usize>().ok())
                    .unwrap_or(0);
                let mut body = vec![0; length];
                let _ = reader.read_exact(&mut body);
                let (path, query) = target.split_once('?').unwrap_or((&target, ""));
                let request = Request {
                    method,
                    path: percent_decode(path),
                    query: form_urlencoded::parse(query.as_bytes()).into_owned().collect(),
                    headers,
                    body: String::from_utf8_lossy(&body).into_owned(),
                    at: Instant::now(),
                };
                log.lock().unwrap().push(request.clone());
                let answer = handler(&request);
                let mut text = format!(
                    "HTTP/1.1 {} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
                    answer.status,
                    answer.body.len()
                );
                for (name, value) in &answer.headers {
                    text.push_str(&format!("{name}: {value}\r\n"));
                }
                text.push_str("\r\n");
                text.push_str(&answer.body);
                let mut stream = stream;
                let _ = stream.write_all(text.as_bytes());
            });
        }
    });
    port
}

fn percent_decode(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%'
            && index + 2 < bytes.len()
            && let Ok(byte) = u8::from_str_radix(&path[index + 1..index + 3], 16)
        {
            out.push(byte);
            index += 3;
        } else {
            out.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads a quoted literal at the start of `text` (`'…'` or `"…"`, with
/// backslash escapes): its value and the text after it.
pub fn read_literal(text: &str) -> Option<(String, &str)> {
    let mut chars = text.char_indices();
    let (_, quote) = chars.next()?;
    if quote != '\'' && quote != '"' {
        return None;
    }
    let mut value = String::new();
    while let Some((index, c)) = chars.next() {
        match c {
            '\\' => {
                let (_, escaped) = chars.next()?;
                value.push(match escaped {
                    'n' | 'N' => '\n',
                    'r' | 'R' => '\r',
                    't' | 'T' => '\t',
                    'b' | 'B' => '\u{8}',
                    'f' | 'F' => '\u{c}',
                    other => other,
                });
            }
            c if c == quote => return Some((value, &text[index + 1..])),
            c => value.push(c),
        }
    }
    None
}

/// Everything a fake shares with its test.
pub struct Fake {
    pub port: u16,
    pub log: Arc<Mutex<Vec<Request>>>,
    /// Every answer is this late.
    pub delay_ms: Arc<AtomicU32>,
}

impl Fake {
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn requests(&self) -> Vec<Request> {
        self.log.lock().unwrap().clone()
    }

    pub fn count(&self, path_prefix: &str) -> usize {
        self.log.lock().unwrap().iter().filter(|request| request.path.starts_with(path_prefix)).count()
    }

    fn start(handler: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> Fake {
        let log = Arc::new(Mutex::new(Vec::new()));
        let delay_ms = Arc::new(AtomicU32::new(0));
        let delay = delay_ms.clone();
        let handler = move |request: &Request| {
            let wait = delay.load(Ordering::SeqCst);
            if wait > 0 {
                std::thread::sleep(Duration::from_millis(u64::from(wait)));
            }
            handler(request)
        };
        let port = serve(Arc::new(handler), log.clone());
        Fake { port, log, delay_ms }
    }
}

// ---------------------------------------------------------------- Airtable

pub const AIRTABLE_TOKEN: &str = "patQ7xTESTtoken0.a1b2c3d4e5f60718293a4b5c6d7e8f90";
pub const AIRTABLE_BASE: &str = "appTESTbase00001";
/// A base whose token lacks access.
pub const AIRTABLE_FORBIDDEN_BASE: &str = "appNOACCESS00001";

/// The `Customers` table: `Customer 001` … and a few hostile names.
pub fn airtable_names(count: usize) -> Vec<String> {
    let mut names: Vec<String> = (1..=count).map(|n| format!("Customer {n:03}")).collect();
    names.push("O'Brien \"the\" \\ Great".to_owned());
    names.push("x\" , TRUE()) & (\"".to_owned());
    names
}

pub struct FakeAirtable {
    pub fake: Fake,
    /// Answer this many requests with 429 first.
    pub rate_limits: Arc<AtomicU32>,
    /// Requests beyond 5 in any second, per base (the real limit).
    pub over_rate: Arc<AtomicU32>,
}

impl FakeAirtable {
    pub fn start(records: usize) -> FakeAirtable {
        let rate_limits = Arc::new(AtomicU32::new(0));
        let over_rate = Arc::new(AtomicU32::new(0));
        let (limits, over) = (rate_limits.clone(), over_rate.clone());
        let names = airtable_names(records);
        let seen: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
        let fake = Fake::start(move |request| {
            {
                // Airtable's limit is per base: 5 requests in any second.
                let base = request.path.trim_start_matches("/v0/").split('/').next().unwrap_or_default().to_owned();
                let mut seen = seen.lock().unwrap();
                seen.retain(|(_, at)| request.at.duration_since(*at) < Duration::from_secs(1));
                seen.push((base.clone(), request.at));
                if seen.iter().filter(|(seen_base, _)| *seen_base == base).count() > 5 {
                    over.fetch_add(1, Ordering::SeqCst);
                    return reply(429, fixture("airtable/error_429.json"));
                }
            }
            if limits.load(Ordering::SeqCst) > 0 {
                limits.fetch_sub(1, Ordering::SeqCst);
                return reply(429, fixture("airtable/error_429.json"));
            }
            if request.bearer() != Some(AIRTABLE_TOKEN) {
                return reply(401, fixture("airtable/error_401.json"));
            }
            if request.path == "/v0/meta/whoami" {
                return reply(200, fixture("airtable/whoami.json"));
            }
            let segments: Vec<&str> = request.path.trim_start_matches("/v0/").split('/').collect();
            let [base, table] = segments[..] else { return reply(404, fixture("airtable/error_404.json")) };
            if base == AIRTABLE_FORBIDDEN_BASE {
                return reply(403, fixture("airtable/error_403.json"));
            }
            if base == AIRTABLE_BASE && table == "Restaurants" {
                // The documentation's own answer, then its last page.
                let mut page: Value = serde_json::from_str(&fixture("airtable/list_records.json")).unwrap();
                if request.param("offset") == page["offset"].as_str() {
                    page.as_object_mut().unwrap().remove("offset");
                }
                return reply(200, page.to_string());
            }
            if base != AIRTABLE_BASE || table != "Customers" {
                return reply(404, fixture("airtable/error_404.json"));
            }
            airtable_list(request, &names)
        });
        FakeAirtable { fake, rate_limits, over_rate }
    }
}

/// `GET /v0/{base}/Customers` as List records answers: `pageSize` (≤ 100),
/// `offset`, `maxRecords`, `fields[]`, and `filterByFormula` of the one
/// form `{Name} = "…"` (anything else is an invalid formula).
fn airtable_list(request: &Request, names: &[String]) -> Reply {
    let mut selected: Vec<(usize, &String)> = names.iter().enumerate().collect();
    if let Some(formula) = request.param("filterByFormula") {
        let wanted = formula.strip_prefix("{Name} = ").and_then(read_literal);
        match wanted {
            Some((value, "")) => selected.retain(|(_, name)| **name == value),
            _ => return reply(422, fixture("airtable/error_422_invalid_filter.json")),
        }
    }
    let page_size: usize = request.param("pageSize").and_then(|size| size.parse().ok()).unwrap_or(100);
    if page_size == 0 || page_size > 100 {
        return reply(422, json!({"error": {"type": "INVALID_REQUEST_UNKNOWN", "message": "pageSize"}}).to_string());
    }
    let max_records: usize = request.param("maxRecords").and_then(|size| size.parse().ok()).unwrap_or(usize::MAX);
    let start: usize = request.param("offset").and_then(|offset| offset.strip_prefix("itr")?.parse().ok()).unwrap_or(0);
    let end = (start + page_size).min(selected.len()).min(max_records);
    let fields: Vec<&str> =
        request.query.iter().filter(|(key, _)| key == "fields[]").map(|(_, value)| value.as_str()).collect();
    let records: Vec<Value> = selected[start.min(end)..end]
        .iter()
        .map(|(index, name)| {
            let mut record_fields = json!({"Name": name, "Seats": index * 2, "Visited": index % 2 == 0,
                "Members": ["recKYq9fmAlzYhkMw"]});
            if !fields.is_empty() {
                record_fields.as_object_mut().unwrap().retain(|key, _| fields.contains(&key.as_str()));
            }
            json!({"id": format!("rec{index:014}"), "createdTime": "2022-09-12T21:03:48.000Z", "fields": record_fields})
        })
        .collect();
    let mut body = json!({"records": records});
    if end < selected.len().min(max_records) {
        body["offset"] = json!(format!("itr{end}"));
    }
    reply(200, body.to_string())
}

// ------------------------------------------------------------ Google Sheets

pub const SHEETS_SPREADSHEET: &str = "1BxiMVs0XRA5nFMdKvBdBZjgmUUqptlbs74OgvE2upms";
pub const SHEETS_API_KEY: &str = "AIzaSyTESTkey-0123456789abcdefghijklmno";
pub const SHEETS_CLIENT_EMAIL: &str = "tally-reader@test-project.iam.gserviceaccount.com";

/// A service account: its private key (PKCS#8 PEM, as Google issues it)
/// and the public key the fake verifies assertions with.
pub struct ServiceAccount {
    pub private_key_pem: String,
    pub public_key_der: Vec<u8>,
}

impl ServiceAccount {
    pub fn generate() -> ServiceAccount {
        use aws_lc_rs::encoding::AsDer;
        use aws_lc_rs::signature::KeyPair;
        let key = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).expect("an RSA key");
        let pkcs8 = key.as_der().expect("PKCS#8");
        let encoded = base64_lines(pkcs8.as_ref());
        let private_key_pem = format!("-----BEGIN PRIVATE KEY-----\n{encoded}-----END PRIVATE KEY-----\n");
        ServiceAccount { private_key_pem, public_key_der: key.public_key().as_ref().to_vec() }
    }

    /// The key file Google would let one download, for `token_uri`.
    pub fn key_file(&self, token_uri: &str) -> String {
        json!({
            "type": "service_account",
            "project_id": "test-project",
            "private_key_id": "4f0e2b1c9a8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f",
            "private_key": self.private_key_pem,
            "client_email": SHEETS_CLIENT_EMAIL,
            "client_id": "103958872740123456789",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": token_uri,
        })
        .to_string()
    }
}

fn base64_lines(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut text = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (index, byte)| n | u32::from(*byte) << (16 - 8 * index));
        for index in 0..4 {
            if index <= chunk.len() {
                text.push(ALPHABET[(n >> (18 - 6 * index) & 63) as usize] as char);
            } else {
                text.push('=');
            }
        }
    }
    text.as_bytes().chunks(64).map(|line| format!("{}\n", String::from_utf8_lossy(line))).collect()
}

fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    let mut bits = 0u32;
    let mut count = 0;
    let mut out = Vec::new();
    for c in text.bytes() {
        let value = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        bits = bits << 6 | u32::from(value);
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
        }
    }
    Some(out)
}

pub struct FakeSheets {
    pub fake: Fake,
    /// Tokens issued, and assertions refused (with why).
    pub issued: Arc<AtomicU32>,
    pub refused: Arc<Mutex<Vec<String>>>,
    /// Answer the next values requests with 429.
    pub rate_limits: Arc<AtomicU32>,
    /// The Retry-After of those 429s, in seconds.
    pub retry_after_s: Arc<AtomicU32>,
    /// Refuse every access token issued so far (as after a revocation).
    pub expire_tokens: Arc<AtomicBool>,
}

impl FakeSheets {
    /// `expires_in` of the tokens it issues.
    pub fn start(public_key_der: Vec<u8>, expires_in: u64) -> FakeSheets {
        let issued = Arc::new(AtomicU32::new(0));
        let refused: Arc<Mutex<Vec<String>>> = Arc::default();
        let rate_limits = Arc::new(AtomicU32::new(0));
        let retry_after_s = Arc::new(AtomicU32::new(42));
        let pause = retry_after_s.clone();
        let expire_tokens = Arc::new(AtomicBool::new(false));
        let valid: Arc<Mutex<Vec<String>>> = Arc::default();
        let (count, refusals, limits, expire) =
            (issued.clone(), refused.clone(), rate_limits.clone(), expire_tokens.clone());
        let port_cell: Arc<Mutex<u16>> = Arc::default();
        let port_of = port_cell.clone();
        let fake = Fake::start(move |request| {
            let token_uri = format!("http://127.0.0.1:{}/token", port_of.lock().unwrap());
            if request.path == "/token" {
                return match check_assertion(request, &public_key_der, &token_uri) {
                    Ok(()) => {
                        let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                        let token = format!("ya29.test-access-{n}");
                        valid.lock().unwrap().push(token.clone());
                        let mut body: Value = serde_json::from_str(&fixture("google_sheets/token.json")).unwrap();
                        body["access_token"] = json!(token);
                        body["expires_in"] = json!(expires_in);
                        reply(200, body.to_string())
                    }
                    Err(why) => {
                        refusals.lock().unwrap().push(why);
                        reply(400, fixture("google_sheets/token_error.json"))
                    }
                };
            }
            if expire.swap(false, Ordering::SeqCst) {
                valid.lock().unwrap().clear();
            }
            let authorized = match (request.bearer(), request.param("key")) {
                (Some(token), _) => valid.lock().unwrap().iter().any(|valid| valid == token),
                (None, Some(key)) => key == SHEETS_API_KEY,
                _ => false,
            };
            if !authorized {
                return reply(
                    401,
                    json!({"error": {"code": 401, "message": "Request had invalid authentication credentials.",
                        "status": "UNAUTHENTICATED"}})
                    .to_string(),
                );
            }
            let Some(rest) = request.path.strip_prefix("/v4/spreadsheets/") else {
                return reply(404, fixture("google_sheets/error_404.json"));
            };
            let (spreadsheet, range) = match rest.split_once("/values/") {
                Some((spreadsheet, range)) => (spreadsheet, Some(range)),
                None => (rest, None),
            };
            if spreadsheet == "1PRIVATEsheet" {
                return reply(403, fixture("google_sheets/error_403.json"));
            }
            if spreadsheet != SHEETS_SPREADSHEET {
                return reply(404, fixture("google_sheets/error_404.json"));
            }
            let Some(range) = range else {
                return reply(200, fixture("google_sheets/spreadsheet.json"));
            };
            if limits.load(Ordering::SeqCst) > 0 {
                limits.fetch_sub(1, Ordering::SeqCst);
                let wait = pause.load(Ordering::SeqCst).to_string();
                return reply(429, fixture("google_sheets/error_429.json")).with("Retry-After", &wait);
            }
            if range.starts_with("Doc!") {
                return reply(200, fixture("google_sheets/values_get.json"));
            }
            if !range.starts_with("Sheet1!") {
                return reply(400, fixture("google_sheets/error_400_range.json"));
            }
            let mut values = vec![json!(["Name", "Seats", "Opened", "Name"])];
            values.extend((1..=12).map(|n| {
                if n == 5 {
                    json!([format!("Site {n}"), n])
                } else {
                    json!([format!("Site {n}"), n, "2024-01-05", "x"])
                }
            }));
            let body = json!({"range": format!("{range}"), "majorDimension": "ROWS", "values": values});
            reply(200, body.to_string())
        });
        *port_cell.lock().unwrap() = fake.port;
        FakeSheets { fake, issued, refused, rate_limits, retry_after_s, expire_tokens }
    }
}

/// The JWT-bearer grant as Google checks it: the grant type, the RS256
/// signature under the account's public key, and the claims.
fn check_assertion(request: &Request, public_key_der: &[u8], token_uri: &str) -> Result<(), String> {
    if request.form_field("grant_type").as_deref() != Some("urn:ietf:params:oauth:grant-type:jwt-bearer") {
        return Err("grant_type".into());
    }
    let assertion = request.form_field("assertion").ok_or("no assertion")?;
    let parts: Vec<&str> = assertion.split('.').collect();
    let [header, claims, signature] = parts[..] else { return Err("not a JWT".into()) };
    let header: Value =
        serde_json::from_slice(&base64url_decode(header).ok_or("header")?).map_err(|e| e.to_string())?;
    if header["alg"] != "RS256" {
        return Err(format!("alg {}", header["alg"]));
    }
    let signature = base64url_decode(signature).ok_or("signature encoding")?;
    let signed = format!("{}.{}", parts[0], parts[1]);
    aws_lc_rs::signature::UnparsedPublicKey::new(&aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256, public_key_der)
        .verify(signed.as_bytes(), &signature)
        .map_err(|_| "the signature does not verify".to_owned())?;
    let claims: Value =
        serde_json::from_slice(&base64url_decode(claims).ok_or("claims")?).map_err(|e| e.to_string())?;
    let now = chrono::Utc::now().timestamp();
    let (iat, exp) = (claims["iat"].as_i64().unwrap_or(0), claims["exp"].as_i64().unwrap_or(0));
    let checks = [
        (claims["iss"] == SHEETS_CLIENT_EMAIL, "iss"),
        (claims["scope"] == "https://www.googleapis.com/auth/spreadsheets.readonly", "scope"),
        (claims["aud"] == token_uri, "aud"),
        ((now - 60..=now + 60).contains(&iat), "iat"),
        (exp > now && exp - iat <= 3600, "exp"),
    ];
    match checks.iter().find(|(ok, _)| !ok) {
        Some((_, claim)) => Err(format!("claim {claim}: {claims}")),
        None => Ok(()),
    }
}

// --------------------------------------------------------------- Salesforce

pub const SF_CLIENT_ID: &str = "3MVG9TESTclientid.0123456789abcdefABCDEF";
pub const SF_CLIENT_SECRET: &str = "SFSECRET0123456789ABCDEF0123456789ABCDEF";
pub const SF_REFRESH_TOKEN: &str = "5Aep861TESTrefresh.0123456789abcdefghij";
pub const SF_VERSION: &str = "66.0";

pub struct FakeSalesforce {
    pub fake: Fake,
    /// Where the token answer says the instance is (itself by default).
    pub instance_url: Arc<Mutex<String>>,
    pub tokens_issued: Arc<AtomicU32>,
    /// Tokens die after this many API requests each.
    pub token_uses: Arc<AtomicU32>,
    /// Answer REQUEST_LIMIT_EXCEEDED.
    pub over_limit: Arc<AtomicBool>,
    /// The org's API calls of the last 24 hours, as Sforce-Limit-Info says.
    pub api_used: Arc<AtomicU32>,
    /// Revoke every token issued so far (sessions timed out).
    pub expire_tokens: Arc<AtomicBool>,
}

/// The `Account` records: `Account 0001`… and hostile names.
pub fn salesforce_names(count: usize) -> Vec<String> {
    let mut names: Vec<String> = (1..=count).map(|n| format!("Account {n:04}")).collect();
    names.push("O'Brien \\' OR Name != '".to_owned());
    names
}

impl FakeSalesforce {
    /// `records` accounts, served `batch` a page.
    pub fn start(records: usize, batch: usize) -> FakeSalesforce {
        let instance_url: Arc<Mutex<String>> = Arc::default();
        let tokens_issued = Arc::new(AtomicU32::new(0));
        let token_uses = Arc::new(AtomicU32::new(1_000));
        let over_limit = Arc::new(AtomicBool::new(false));
        let api_used = Arc::new(AtomicU32::new(1_200));
        let expire_tokens = Arc::new(AtomicBool::new(false));
        let (instance, issued, uses, over, used, expire) = (
            instance_url.clone(),
            tokens_issued.clone(),
            token_uses.clone(),
            over_limit.clone(),
            api_used.clone(),
            expire_tokens.clone(),
        );
        let live: Arc<Mutex<Vec<(String, u32)>>> = Arc::default();
        let names = salesforce_names(records);
        let fake = Fake::start(move |request| {
            if request.path == "/services/oauth2/token" {
                let form = request.form();
                let field = |name: &str| form.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str());
                let granted = match field("grant_type") {
                    Some("client_credentials") => {
                        field("client_id") == Some(SF_CLIENT_ID) && field("client_secret") == Some(SF_CLIENT_SECRET)
                    }
                    Some("refresh_token") => {
                        field("client_id") == Some(SF_CLIENT_ID) && field("refresh_token") == Some(SF_REFRESH_TOKEN)
                    }
                    _ => false,
                };
                if !granted {
                    return reply(400, fixture("salesforce/token_error.json"));
                }
                let n = issued.fetch_add(1, Ordering::SeqCst) + 1;
                let token = format!("00DTEST!session.{n}");
                live.lock().unwrap().push((token.clone(), uses.load(Ordering::SeqCst)));
                let mut body: Value =
                    serde_json::from_str(&fixture("salesforce/token_client_credentials.json")).unwrap();
                body["access_token"] = json!(token);
                body["instance_url"] = json!(instance.lock().unwrap().clone());
                return reply(200, body.to_string());
            }
            // The API: a live token, each use counted.
            let authorized = {
                let mut live = live.lock().unwrap();
                if expire.swap(false, Ordering::SeqCst) {
                    live.clear();
                }
                match live.iter_mut().find(|(token, _)| Some(token.as_str()) == request.bearer()) {
                    Some((_, left)) if *left > 0 => {
                        *left -= 1;
                        true
                    }
                    _ => false,
                }
            };
            if !authorized {
                return reply(401, fixture("salesforce/error_invalid_session.json"));
            }
            let usage = format!("api-usage={}/15000", used.fetch_add(1, Ordering::SeqCst) + 1);
            let answer = salesforce_api(request, &names, batch, &over);
            answer.with("Sforce-Limit-Info", &usage)
        });
        *instance_url.lock().unwrap() = fake.url("");
        FakeSalesforce { fake, instance_url, tokens_issued, token_uses, over_limit, api_used, expire_tokens }
    }
}

const SF_QUERY_PREFIX: &str = "SELECT Id, Name FROM Account";

fn salesforce_api(request: &Request, names: &[String], batch: usize, over: &AtomicBool) -> Reply {
    if over.load(Ordering::SeqCst) {
        return reply(403, fixture("salesforce/error_request_limit.json"));
    }
    if request.path == "/services/data/" {
        return reply(200, fixture("salesforce/versions.json"));
    }
    // The documentation's own pages, at the version they show.
    if request.path == "/services/data/v67.0/query" {
        return reply(200, fixture("salesforce/query_page1.json"));
    }
    if request.path == "/services/data/v67.0/query/01gD0000002HU6KIAW-2" {
        return reply(200, fixture("salesforce/query_last_page.json"));
    }
    let data = format!("/services/data/v{SF_VERSION}/query");
    let (selected, start): (Vec<usize>, usize) = if request.path == data {
        // The one shape this org understands: the prefix, then an optional
        // `WHERE Name = '…'` and nothing after.
        let soql = request.param("q").unwrap_or_default();
        let Some(rest) = soql.strip_prefix(SF_QUERY_PREFIX) else {
            if soql.contains("Foo__c") {
                return reply(400, fixture("salesforce/error_invalid_field.json"));
            }
            return reply(400, fixture("salesforce/error_malformed_query.json"));
        };
        let all: Vec<usize> = (0..names.len()).collect();
        let selected = if rest.is_empty() {
            all
        } else {
            match rest.strip_prefix(" WHERE Name = ").and_then(read_literal) {
                Some((value, "")) => all.into_iter().filter(|index| names[*index] == value).collect(),
                _ => return reply(400, fixture("salesforce/error_malformed_query.json")),
            }
        };
        (selected, 0)
    } else if let Some(locator) = request.path.strip_prefix(&format!("{data}/")) {
        // `{filter}-{start}`: the filter is all (`ALL`) or one index.
        let (filter, start) = locator.split_once('-').unwrap_or(("", "0"));
        let selected = match filter {
            "ALL" => (0..names.len()).collect(),
            index => index.parse().into_iter().collect(),
        };
        (selected, start.parse().unwrap_or(0))
    } else {
        return reply(
            404,
            json!([{"message": "The requested resource does not exist", "errorCode": "NOT_FOUND"}]).to_string(),
        );
    };
    let batch = request
        .header("sforce-query-options")
        .and_then(|options| options.strip_prefix("batchSize="))
        .and_then(|size| size.parse::<usize>().ok())
        .unwrap_or(2_000)
        .clamp(200, 2_000)
        .min(batch);
    let end = (start + batch).min(selected.len());
    let records: Vec<Value> = selected[start.min(end)..end]
        .iter()
        .map(|index| {
            let id = format!("001D{index:014}");
            json!({"attributes": {"type": "Account", "url": format!("/services/data/v{SF_VERSION}/sobjects/Account/{id}")},
                "Id": id, "Name": names[*index]})
        })
        .collect();
    let mut body = json!({"totalSize": selected.len(), "done": end == selected.len(), "records": records});
    if end < selected.len() {
        let filter = if selected.len() == names.len() { "ALL".to_owned() } else { selected[0].to_string() };
        body["nextRecordsUrl"] = json!(format!("{data}/{filter}-{end}"));
    }
    reply(200, body.to_string())
}
