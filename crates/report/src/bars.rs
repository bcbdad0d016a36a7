//! Horizontal bar charts (rankings, verification tables) and histograms.

use crate::{err, palette, render_pair, Result, FONT};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default)]
pub struct Bar {
    pub label: String,
    pub value: f64,
    /// Symmetric error bar (e.g. one sd).
    pub err: Option<f64>,
    /// Colour group (index into `BarChart::groups`).
    pub group: usize,
}

#[derive(Debug, Clone, Default)]
pub struct BarChart {
    pub title: String,
    pub x_label: String,
    /// Top to bottom.
    pub bars: Vec<Bar>,
    /// Legend names of the colour groups.
    pub groups: Vec<String>,
    pub caption: String,
}

fn draw_bars<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, c: &BarChart) -> Result<()> {
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
    let n = c.bars.len().max(1);
    let mut lo = 0f64;
    let mut hi = 0f64;
    for b in &c.bars {
        let e = b.err.unwrap_or(0.0);
        lo = lo.min(b.value - e);
        hi = hi.max(b.value + e);
    }
    if hi <= lo {
        hi = lo + 1.0;
    }
    let pad = (hi - lo) * 0.06;
    let label_w = c
        .bars
        .iter()
        .map(|b| b.label.chars().count())
        .max()
        .unwrap_or(8)
        .clamp(8, 60) as u32
        * 7
        + 10;
    let mut chart = ChartBuilder::on(&area)
        .caption(&c.title, (FONT, 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(label_w)
        .build_cartesian_2d((lo - pad)..(hi + pad), (0..n as i32).into_segmented())
        .map_err(se)?;
    let labels: Vec<String> = c.bars.iter().map(|b| b.label.clone()).collect();
    // row i (top to bottom) sits in segment n-1-i
    chart
        .configure_mesh()
        .x_desc(&c.x_label)
        .y_labels(n)
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(k) if (*k as usize) < n => {
                labels.get(n - 1 - *k as usize).cloned().unwrap_or_default()
            }
            _ => String::new(),
        })
        .disable_y_mesh()
        .light_line_style(RGBColor(240, 240, 240))
        .label_style((FONT, 12))
        .draw()
        .map_err(se)?;
    for (i, b) in c.bars.iter().enumerate() {
        let k = (n - 1 - i) as i32;
        let col = palette(b.group);
        let mut rect = Rectangle::new(
            [
                (0.0, SegmentValue::Exact(k)),
                (b.value, SegmentValue::Exact(k + 1)),
            ],
            col.mix(0.8).filled(),
        );
        rect.set_margin(4, 4, 0, 0);
        chart.draw_series(std::iter::once(rect)).map_err(se)?;
        if let Some(e) = b.err {
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![
                        (b.value - e, SegmentValue::CenterOf(k)),
                        (b.value + e, SegmentValue::CenterOf(k)),
                    ],
                    BLACK.stroke_width(1),
                )))
                .map_err(se)?;
        }
    }
    for (g, name) in c.groups.iter().enumerate() {
        let col = palette(g);
        chart
            .draw_series(std::iter::empty::<Rectangle<(f64, SegmentValue<i32>)>>())
            .map_err(se)?
            .label(name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], col.filled()));
    }
    if !c.groups.is_empty() {
        chart
            .configure_series_labels()
            .label_font((FONT, 12))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(200, 200, 200))
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(se)?;
    }
    Ok(())
}

/// Writes `stem.png` and `stem.svg`; height grows with the number of bars.
pub fn save_bar_chart(c: &BarChart, stem: &Path) -> Result<Vec<PathBuf>> {
    let h = (120 + 26 * c.bars.len()).clamp(300, 1400) as u32;
    render_pair!(stem, (1000, h), &c.title, |root| {
        draw_bars(&root, c)?;
    })
}

#[derive(Debug, Clone, Default)]
pub struct Histogram {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub values: Vec<f64>,
    pub bins: usize,
    pub range: (f64, f64),
    /// Vertical reference lines (e.g. class thresholds).
    pub vlines: Vec<(f64, String)>,
    pub caption: String,
    /// Log-scale counts (log10(1 + count)).
    pub log_counts: bool,
}

fn draw_hist<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, h: &Histogram) -> Result<()> {
    let e = err::<String>(&h.title);
    let se = |x: DrawingAreaErrorKind<DB::ErrorType>| e(x.to_string());
    root.fill(&WHITE).map_err(se)?;
    let (area, foot) = root.split_vertically(root.dim_in_pixel().1 - 24);
    foot.draw_text(
        &h.caption,
        &(FONT, 12).into_font().color(&RGBColor(90, 90, 90)),
        (10, 4),
    )
    .map_err(se)?;
    let bins = h.bins.max(1);
    let (a, b) = h.range;
    let w = (b - a) / bins as f64;
    let mut counts = vec![0usize; bins];
    for &v in h.values.iter().filter(|v| v.is_finite()) {
        let i = (((v - a) / w).floor().max(0.0) as usize).min(bins - 1);
        counts[i] += 1;
    }
    let tr = |c: usize| {
        if h.log_counts {
            (1.0 + c as f64).log10()
        } else {
            c as f64
        }
    };
    let ymax = counts.iter().map(|&c| tr(c)).fold(1.0, f64::max) * 1.08;
    let mut chart = ChartBuilder::on(&area)
        .caption(&h.title, (FONT, 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(a..b, 0f64..ymax)
        .map_err(se)?;
    chart
        .configure_mesh()
        .x_desc(&h.x_label)
        .y_desc(&h.y_label)
        .light_line_style(RGBColor(245, 245, 245))
        .label_style((FONT, 12))
        .draw()
        .map_err(se)?;
    let col = palette(0);
    chart
        .draw_series(counts.iter().enumerate().map(|(i, &c)| {
            let x0 = a + i as f64 * w;
            Rectangle::new([(x0, 0.0), (x0 + w * 0.95, tr(c))], col.mix(0.8).filled())
        }))
        .map_err(se)?;
    for (i, (x, label)) in h.vlines.iter().enumerate() {
        let c = palette(i + 1);
        chart
            .draw_series(DashedLineSeries::new(
                vec![(*x, 0.0), (*x, ymax)],
                4,
                3,
                ShapeStyle::from(&c).stroke_width(1),
            ))
            .map_err(se)?
            .label(label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c));
    }
    if !h.vlines.is_empty() {
        chart
            .configure_series_labels()
            .label_font((FONT, 12))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(200, 200, 200))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(se)?;
    }
    Ok(())
}

pub fn save_histogram(h: &Histogram, stem: &Path) -> Result<Vec<PathBuf>> {
    render_pair!(stem, (960, 480), &h.title, |root| {
        draw_hist(&root, h)?;
    })
}
