//! The demo's data source: a small HTTP server on a free loopback port,
//! started by `serve --demo` only, that the demo's REST and GraphQL
//! integrations point at, so that the quickstart can run a query without
//! reaching past the machine. Its answers are made up but steady: the same
//! city always has the same forecast.
//!
//! - `GET /health` → `{"ok": true}`
//! - `GET /forecast/{city}` → `{"city", "items": [7 days of {day, high_c, low_c, summary}]}`
//! - `POST /graphql` → `{ __typename }`, or `products(category)` as
//!   `{"data": {"products": [{sku, name, category, price}]}}`

use actix_web::{App, HttpResponse, HttpServer, web};
use anyhow::{Context, Result};
use serde_json::{Value, json};
use std::net::SocketAddr;

const SUMMARIES: [&str; 5] = ["sunny", "cloudy", "rain", "windy", "snow"];
const PRODUCTS: [(&str, &str, &str, i64); 6] = [
    ("sku-1", "Ledger Lite", "software", 1_900),
    ("sku-2", "Ledger Pro", "software", 9_900),
    ("sku-3", "Audit Pack", "services", 25_000),
    ("sku-4", "Webhook Relay", "software", 4_900),
    ("sku-5", "Onboarding", "services", 50_000),
    ("sku-6", "Support Plus", "services", 12_000),
];

/// The forecast of a city: seven days, steady for the same city.
pub fn forecast(city: &str) -> Value {
    // FNV-1a of the lower-cased name: a seed, not a secret.
    let hash = city
        .to_lowercase()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3));
    let seed = hash.to_be_bytes();
    let items: Vec<Value> = (0..7)
        .map(|day| {
            let byte = i64::from(seed[day]);
            let high = 5 + byte % 25;
            json!({
                "day": day + 1,
                "high_c": high,
                "low_c": high - 3 - byte % 7,
                "summary": SUMMARIES[(byte as usize) % SUMMARIES.len()],
            })
        })
        .collect();
    json!({"city": city, "items": items})
}

async fn graphql(body: web::Json<Value>) -> HttpResponse {
    let document = body.get("query").and_then(Value::as_str).unwrap_or_default();
    if document.contains("__typename") && !document.contains("products") {
        return HttpResponse::Ok().json(json!({"data": {"__typename": "Query"}}));
    }
    if !document.contains("products") {
        return HttpResponse::Ok().json(json!({"errors": [{"message": "the demo knows only `products(category)`"}]}));
    }
    let category = body.pointer("/variables/category").and_then(Value::as_str);
    let products: Vec<Value> = PRODUCTS
        .iter()
        .filter(|(_, _, kind, _)| category.is_none_or(|category| category == *kind))
        .map(|(sku, name, kind, price)| json!({"sku": sku, "name": name, "category": kind, "price": price}))
        .collect();
    HttpResponse::Ok().json(json!({"data": {"products": products}}))
}

/// Starts the demo upstream on `127.0.0.1:0` in a thread of its own and
/// returns its address; it lives as long as the process.
pub fn start() -> Result<SocketAddr> {
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("tally-demo-upstream".to_owned())
        .spawn(move || {
            let system = actix_web::rt::System::new();
            let started = system.block_on(async {
                let server = HttpServer::new(|| {
                    App::new()
                        .route("/health", web::get().to(|| async { HttpResponse::Ok().json(json!({"ok": true})) }))
                        .route(
                            "/forecast/{city}",
                            web::get()
                                .to(|city: web::Path<String>| async move { HttpResponse::Ok().json(forecast(&city)) }),
                        )
                        .route("/graphql", web::post().to(graphql))
                })
                .workers(1)
                .bind(("127.0.0.1", 0))?;
                let address = server.addrs()[0];
                Ok::<_, std::io::Error>((server.run(), address))
            });
            match started {
                Ok((server, address)) => {
                    let _ = sender.send(Ok(address));
                    let _ = system.block_on(server);
                }
                Err(error) => {
                    let _ = sender.send(Err(error));
                }
            }
        })
        .context("cannot start the demo upstream")?;
    let address = receiver.recv().context("the demo upstream did not start")?;
    address.context("the demo upstream cannot listen on loopback")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_city_always_has_the_same_week() {
        assert_eq!(forecast("paris")["items"], forecast("Paris")["items"]);
        assert_eq!(forecast("paris")["items"].as_array().unwrap().len(), 7);
        assert_ne!(forecast("paris")["items"], forecast("lyon")["items"]);
    }
}
