//! Plots for persona-lens results, written as PNG and SVG side by side (atomically), with an
//! embedded font (DejaVu Sans, Bitstream Vera licence) so rendering needs no system fonts.

use persona_lens_atomic::write_atomic;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Once;

pub mod bars;
pub mod document;
pub mod heatmap;
pub use bars::{save_bar_chart, save_histogram, Bar, BarChart, Histogram};
pub use document::{Block, Document};
pub use heatmap::{save_heatmap, Heatmap};

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("plot '{0}': {1}")]
    Plot(String, String),
    #[error("{0}")]
    Io(String),
}

pub type Result<T> = std::result::Result<T, ReportError>;

pub(crate) const FONT: &str = "sans-serif";
static FONT_ONCE: Once = Once::new();

pub(crate) fn ensure_font() {
    FONT_ONCE.call_once(|| {
        let bytes: &'static [u8] = include_bytes!("../assets/DejaVuSans.ttf");
        // The bundled font is valid; a failure here would only mean no text.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, bytes);
        let _ = plotters::style::register_font(FONT, FontStyle::Bold, bytes);
    });
}

/// One line, optionally with a shaded band (e.g. a 95 % interval) and dashes.
#[derive(Debug, Clone, Default)]
pub struct Series {
    pub name: String,
    pub x: Vec<f64>,
    pub y: Vec<f64>,
    pub band: Option<(Vec<f64>, Vec<f64>)>,
    pub dashed: bool,
}

#[derive(Debug, Clone, Default)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// Fixed y range (default: fit the data and bands).
    pub y_range: Option<(f64, f64)>,
    /// A horizontal reference line (e.g. chance accuracy) and its label.
    pub hline: Option<(f64, String)>,
    /// A footnote with provenance (model, hook, position rule, seed).
    pub caption: String,
}

pub(crate) fn palette(i: usize) -> RGBColor {
    const C: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(255, 127, 14),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    C[i % C.len()]
}

pub(crate) fn err<E: std::fmt::Display>(title: &str) -> impl Fn(E) -> ReportError + '_ {
    move |e| ReportError::Plot(title.to_string(), e.to_string())
}

macro_rules! render_pair {
    ($stem:expr, $size:expr, $title:expr, |$root:ident| $body:block) => {{
        $crate::ensure_font();
        let stem: &std::path::Path = $stem;
        let size: (u32, u32) = $size;
        let mut rgb = vec![0u8; (size.0 * size.1 * 3) as usize];
        {
            let $root = plotters::prelude::BitMapBackend::with_buffer(&mut rgb, size)
                .into_drawing_area();
            $body
            $root.present().map_err($crate::err($title))?;
        }
        let mut svg = String::new();
        {
            let $root = plotters::prelude::SVGBackend::with_string(&mut svg, size)
                .into_drawing_area();
            $body
            $root.present().map_err($crate::err($title))?;
        }
        let png_path = stem.with_extension("png");
        let svg_path = stem.with_extension("svg");
        $crate::write_png(&png_path, size, &rgb)?;
        persona_lens_atomic::write_atomic(&svg_path, svg.as_bytes())
            .map_err(|e| $crate::ReportError::Io(e.to_string()))?;
        Ok(vec![png_path, svg_path])
    }};
}
pub(crate) use render_pair;

pub(crate) fn write_png(path: &Path, size: (u32, u32), rgb: &[u8]) -> Result<()> {
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, size.0, size.1);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc
            .write_header()
            .map_err(|e| ReportError::Io(e.to_string()))?;
        w.write_image_data(rgb)
            .map_err(|e| ReportError::Io(e.to_string()))?;
    }
    write_atomic(path, &bytes).map_err(|e| ReportError::Io(e.to_string()))
}

fn y_extent(c: &LineChart) -> (f64, f64) {
    if let Some(r) = c.y_range {
        return r;
    }
    let mut lo = f64::INFINITY;
    let mut hi = f64::NEG_INFINITY;
    for s in &c.series {
        let band = s.band.iter().flat_map(|(a, b)| a.iter().chain(b.iter()));
        for &v in s.y.iter().chain(band).filter(|v| v.is_finite()) {
            lo = lo.min(v);
            hi = hi.max(v);
        }
    }
    if let Some((h, _)) = &c.hline {
        lo = lo.min(*h);
        hi = hi.max(*h);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.08).max(1e-6);
    (lo - pad, hi + pad)
}

fn draw_line_chart<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, c: &LineChart) -> Result<()> {
    let e = err::<String>(&c.title);
    let se = |x: DrawingAreaErrorKind<DB::ErrorType>| e(x.to_string());
    root.fill(&WHITE).map_err(se)?;
    let (area, foot) = root.split_vertically(root.dim_in_pixel().1 - 24);
    foot.draw_text(
        &c.caption,
        &(FONT, 12).into_font().color(&RGBColor(90, 90, 90)),
        (10, 4),
    )
    .map_err(se)?;
    let xmin = c
        .series
        .iter()
        .flat_map(|s| s.x.iter().copied())
        .fold(f64::INFINITY, f64::min);
    let xmax = c
        .series
        .iter()
        .flat_map(|s| s.x.iter().copied())
        .fold(f64::NEG_INFINITY, f64::max);
    let (xmin, xmax) = if xmin.is_finite() && xmax > xmin {
        (xmin, xmax)
    } else {
        (0.0, 1.0)
    };
    let (ylo, yhi) = y_extent(c);
    let mut chart = ChartBuilder::on(&area)
        .caption(&c.title, (FONT, 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(xmin..xmax, ylo..yhi)
        .map_err(se)?;
    chart
        .configure_mesh()
        .x_desc(&c.x_label)
        .y_desc(&c.y_label)
        .x_label_formatter(&|v| {
            if (v - v.round()).abs() < 1e-9 {
                format!("{v:.0}")
            } else {
                format!("{v:.2}")
            }
        })
        .light_line_style(RGBColor(245, 245, 245))
        .label_style((FONT, 13))
        .draw()
        .map_err(se)?;
    for (i, s) in c.series.iter().enumerate() {
        let col = palette(i);
        if let Some((lo, hi)) = &s.band {
            let mut poly: Vec<(f64, f64)> = s.x.iter().copied().zip(hi.iter().copied()).collect();
            poly.extend(s.x.iter().copied().zip(lo.iter().copied()).rev());
            chart
                .draw_series(std::iter::once(Polygon::new(poly, col.mix(0.18).filled())))
                .map_err(se)?;
        }
        let pts: Vec<(f64, f64)> = s.x.iter().copied().zip(s.y.iter().copied()).collect();
        let style = ShapeStyle::from(&col).stroke_width(2);
        let anno = if s.dashed {
            chart
                .draw_series(DashedLineSeries::new(pts.clone(), 6, 4, style))
                .map_err(se)?
        } else {
            chart
                .draw_series(LineSeries::new(pts.clone(), style))
                .map_err(se)?
        };
        anno.label(s.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], col.stroke_width(2)));
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 2, col.filled())))
            .map_err(se)?;
    }
    if let Some((h, label)) = &c.hline {
        let grey = RGBColor(120, 120, 120);
        chart
            .draw_series(DashedLineSeries::new(
                vec![(xmin, *h), (xmax, *h)],
                3,
                3,
                ShapeStyle::from(&grey).stroke_width(1),
            ))
            .map_err(se)?
            .label(label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], grey));
    }
    chart
        .configure_series_labels()
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(200, 200, 200))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(se)?;
    Ok(())
}

/// Writes `stem.png` and `stem.svg` (960 x 540).
pub fn save_line_chart(c: &LineChart, stem: &Path) -> Result<Vec<PathBuf>> {
    render_pair!(stem, (960, 540), &c.title, |root| {
        draw_line_chart(&root, c)?;
    })
}
