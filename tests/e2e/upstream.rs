//! A small JSON upstream on 127.0.0.1 for the integration tests: the only
//! source the server under test may reach. With the right bearer token,
//! `GET /health` answers 200, `GET /forecast/{city}` seven rows under
//! `items`, `GET /slow` after 3 s; any other token gets 401, `down`
//! makes every answer 503, and `slow` delays every answer by a second.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

pub struct Upstream {
    pub port: u16,
    pub down: Arc<AtomicBool>,
    pub slow: Arc<AtomicBool>,
    pub requests: Arc<AtomicU32>,
}

impl Upstream {
    pub fn start(token: &'static str) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("address").port();
        let down = Arc::new(AtomicBool::new(false));
        let slow = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU32::new(0));
        let (is_down, is_slow, counted) = (down.clone(), slow.clone(), requests.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (is_down, is_slow, counted) = (is_down.clone(), is_slow.clone(), counted.clone());
                std::thread::spawn(move || {
                    counted.fetch_add(1, Ordering::SeqCst);
                    if is_slow.load(Ordering::SeqCst) {
                        std::thread::sleep(std::time::Duration::from_secs(1));
                    }
                    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                    let mut request_line = String::new();
                    let _ = reader.read_line(&mut request_line);
                    let mut authorized = false;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                            break;
                        }
                        if line.to_ascii_lowercase().starts_with("authorization:") {
                            authorized = line.trim_end().ends_with(&format!("Bearer {token}"));
                        }
                    }
                    let path = request_line.split_whitespace().nth(1).unwrap_or("/").to_owned();
                    let (status, body) = if is_down.load(Ordering::SeqCst) {
                        ("503 Service Unavailable", "{\"error\":\"down\"}".to_owned())
                    } else if !authorized {
                        ("401 Unauthorized", "{\"error\":\"bad token\"}".to_owned())
                    } else if let Some(city) = path.strip_prefix("/forecast/") {
                        let items: Vec<String> =
                            (1..=7).map(|day| format!("{{\"day\":{day},\"city\":\"{city}\"}}")).collect();
                        ("200 OK", format!("{{\"items\":[{}]}}", items.join(",")))
                    } else if path == "/slow" {
                        std::thread::sleep(std::time::Duration::from_secs(3));
                        ("200 OK", "[]".to_owned())
                    } else {
                        ("200 OK", "{\"ok\":true}".to_owned())
                    };
                    let answer = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let mut writer = stream;
                    let _ = writer.write_all(answer.as_bytes());
                });
            }
        });
        Upstream { port, down, slow, requests }
    }
}
