//! A local OpenAI-compatible chat-completions server for tests: the answer that contains
//! `marker` wins; the first `fail_first` requests get HTTP 500; requests after `fail_after` get
//! HTTP 400. Counts requests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

pub struct MockJudge {
    pub url: String,
    pub requests: Arc<AtomicUsize>,
}

pub fn start(marker: &'static str, fail_first: usize, fail_after: usize) -> MockJudge {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", l.local_addr().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let n = requests.clone();
    std::thread::spawn(move || {
        for stream in l.incoming() {
            let Ok(mut stream) = stream else { continue };
            let n = n.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(stream.try_clone().unwrap());
                loop {
                    let mut len = 0usize;
                    let mut line = String::new();
                    let mut first = true;
                    loop {
                        line.clear();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if first && !line.starts_with("POST") {
                            return;
                        }
                        first = false;
                        let lower = line.to_ascii_lowercase();
                        if let Some(v) = lower.strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let mut body = vec![0u8; len];
                    if r.read_exact(&mut body).is_err() {
                        return;
                    }
                    let i = n.fetch_add(1, Ordering::SeqCst);
                    let (status, reply) = if i < fail_first {
                        (
                            "500 Internal Server Error",
                            "{\"error\": \"busy\"}".to_string(),
                        )
                    } else if i >= fail_after {
                        ("400 Bad Request", "{\"error\": \"quota\"}".to_string())
                    } else {
                        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                        let user = v["messages"][1]["content"].as_str().unwrap_or("");
                        let a = user.split("Answer A:").nth(1).unwrap_or("");
                        let a = a.split("Answer B:").next().unwrap_or("");
                        let winner = if a.contains(marker) { "A" } else { "B" };
                        let content = format!("{{\"winner\": \"{winner}\"}}");
                        (
                            "200 OK",
                            serde_json::json!({"choices": [{"message": {"role": "assistant", "content": content}}]})
                                .to_string(),
                        )
                    };
                    let resp = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{reply}",
                        reply.len()
                    );
                    if stream.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    MockJudge { url, requests }
}
