//! A small document model for study reports, rendered both as Markdown (plots linked) and as a
//! self-contained HTML page (plots embedded as base64 PNG data URIs, no scripts, no external
//! resources). One source, two renderings: the numbers in both are the same strings.

use base64::Engine as _;
use std::path::Path;

#[derive(Debug, Clone)]
pub enum Block {
    /// Level 1..=3.
    Heading(u8, String),
    /// A paragraph of plain text (`**bold**` and `` `code` `` are kept in Markdown and rendered
    /// as <strong>/<code> in HTML).
    Para(String),
    List(Vec<String>),
    /// Header row and body rows.
    Table(Vec<String>, Vec<Vec<String>>),
    /// A plot: PNG path relative to the report's folder, alt text, caption.
    Image {
        png: String,
        alt: String,
        caption: String,
    },
}

#[derive(Debug, Clone, Default)]
pub struct Document {
    pub title: String,
    pub blocks: Vec<Block>,
}

impl Document {
    pub fn new(title: impl Into<String>) -> Self {
        Document {
            title: title.into(),
            blocks: vec![],
        }
    }
    pub fn h(&mut self, level: u8, text: impl Into<String>) -> &mut Self {
        self.blocks.push(Block::Heading(level, text.into()));
        self
    }
    pub fn p(&mut self, text: impl Into<String>) -> &mut Self {
        self.blocks.push(Block::Para(text.into()));
        self
    }
    pub fn list(&mut self, items: Vec<String>) -> &mut Self {
        if !items.is_empty() {
            self.blocks.push(Block::List(items));
        }
        self
    }
    pub fn table(&mut self, header: Vec<String>, rows: Vec<Vec<String>>) -> &mut Self {
        self.blocks.push(Block::Table(header, rows));
        self
    }
    pub fn image(
        &mut self,
        png: impl Into<String>,
        alt: impl Into<String>,
        caption: impl Into<String>,
    ) -> &mut Self {
        self.blocks.push(Block::Image {
            png: png.into(),
            alt: alt.into(),
            caption: caption.into(),
        });
        self
    }

    pub fn to_markdown(&self) -> String {
        let mut s = format!("# {}\n\n", self.title);
        for b in &self.blocks {
            match b {
                Block::Heading(l, t) => {
                    s.push_str(&format!("{} {t}\n\n", "#".repeat((*l as usize + 1).min(6))))
                }
                Block::Para(t) => s.push_str(&format!("{t}\n\n")),
                Block::List(items) => {
                    for i in items {
                        s.push_str(&format!("- {i}\n"));
                    }
                    s.push('\n');
                }
                Block::Table(h, rows) => {
                    let cell = |c: &String| c.replace('|', "\\|");
                    s.push_str(&format!(
                        "| {} |\n",
                        h.iter().map(cell).collect::<Vec<_>>().join(" | ")
                    ));
                    s.push_str(&format!("|{}\n", "---|".repeat(h.len())));
                    for r in rows {
                        s.push_str(&format!(
                            "| {} |\n",
                            r.iter().map(cell).collect::<Vec<_>>().join(" | ")
                        ));
                    }
                    s.push('\n');
                }
                Block::Image { png, alt, caption } => {
                    s.push_str(&format!("![{alt}]({png})\n\n*{caption}*\n\n"))
                }
            }
        }
        s
    }

    /// Self-contained HTML; images are read from `base` and embedded. A missing image is an
    /// error (a report must not silently lose a plot).
    pub fn to_html(&self, base: &Path) -> crate::Result<String> {
        let mut s =
            String::from("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
        s.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
        s.push_str(&format!("<title>{}</title>\n", esc(&self.title)));
        s.push_str("<style>\nbody{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;line-height:1.5;color:#1a1a1a}\nh1{font-size:1.7rem;border-bottom:2px solid #ddd;padding-bottom:.3rem}h2{font-size:1.35rem;margin-top:2rem;border-bottom:1px solid #eee}h3{font-size:1.1rem}\ntable{border-collapse:collapse;margin:1rem 0;font-size:.9rem}th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:left}th{background:#f3f3f3}\nfigure{margin:1rem 0}img{max-width:100%;border:1px solid #eee}figcaption{font-size:.85rem;color:#555}\ncode{background:#f4f4f4;padding:0 .2rem;border-radius:3px}\n</style>\n</head>\n<body>\n");
        s.push_str(&format!("<h1>{}</h1>\n", esc(&self.title)));
        for b in &self.blocks {
            match b {
                Block::Heading(l, t) => {
                    let l = (*l + 1).min(6);
                    s.push_str(&format!("<h{l}>{}</h{l}>\n", inline(t)))
                }
                Block::Para(t) => s.push_str(&format!("<p>{}</p>\n", inline(t))),
                Block::List(items) => {
                    s.push_str("<ul>\n");
                    for i in items {
                        s.push_str(&format!("<li>{}</li>\n", inline(i)));
                    }
                    s.push_str("</ul>\n");
                }
                Block::Table(h, rows) => {
                    s.push_str("<table>\n<thead><tr>");
                    for c in h {
                        s.push_str(&format!("<th>{}</th>", inline(c)));
                    }
                    s.push_str("</tr></thead>\n<tbody>\n");
                    for r in rows {
                        s.push_str("<tr>");
                        for c in r {
                            s.push_str(&format!("<td>{}</td>", inline(c)));
                        }
                        s.push_str("</tr>\n");
                    }
                    s.push_str("</tbody>\n</table>\n");
                }
                Block::Image { png, alt, caption } => {
                    let p = base.join(png);
                    let bytes = std::fs::read(&p).map_err(|e| {
                        crate::ReportError::Io(format!("report image {}: {e}", p.display()))
                    })?;
                    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
                    s.push_str(&format!(
                        "<figure><img src=\"data:image/png;base64,{b64}\" alt=\"{}\"><figcaption>{}</figcaption></figure>\n",
                        esc(alt),
                        inline(caption)
                    ));
                }
            }
        }
        s.push_str("</body>\n</html>\n");
        Ok(s)
    }
}

fn esc(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// `**bold**` and `` `code` `` to HTML, everything else escaped.
fn inline(t: &str) -> String {
    let e = esc(t);
    let mut out = String::new();
    let mut bold = false;
    let mut code = false;
    let mut chars = e.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '*' && chars.peek() == Some(&'*') && !code {
            chars.next();
            out.push_str(if bold { "</strong>" } else { "<strong>" });
            bold = !bold;
        } else if c == '`' {
            out.push_str(if code { "</code>" } else { "<code>" });
            code = !code;
        } else {
            out.push(c);
        }
    }
    if bold {
        out.push_str("</strong>");
    }
    if code {
        out.push_str("</code>");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_and_html_carry_the_same_text() {
        let mut d = Document::new("T <1>");
        d.h(1, "Key results")
            .p("gap **+1.234** logits at `blocks.3.hook_z`")
            .list(vec!["a | b".into()])
            .table(
                vec!["x".into(), "y".into()],
                vec![vec!["1".into(), "2.5".into()]],
            );
        let md = d.to_markdown();
        assert!(md.contains("## Key results") && md.contains("**+1.234**") && md.contains("a | b"));
        assert!(md.contains("| 1 | 2.5 |"));
        let html = d.to_html(Path::new(".")).unwrap();
        assert!(
            html.contains("<strong>+1.234</strong>")
                && html.contains("<code>blocks.3.hook_z</code>")
        );
        assert!(html.contains("<title>T &lt;1&gt;</title>"));
        assert!(html.contains("<td>2.5</td>"));
        let mut bad = Document::new("x");
        bad.image("missing.png", "m", "c");
        assert!(bad.to_html(Path::new("/nonexistent")).is_err());
    }
}
