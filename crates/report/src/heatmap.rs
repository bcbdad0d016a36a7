//! Heatmaps (layer x position, layer x head) with token labels on the axis and a diverging
//! colour scale centred on zero.

use crate::{err, render_pair, Result, FONT};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default)]
pub struct Heatmap {
    pub title: String,
    /// values[row][col]
    pub values: Vec<Vec<f64>>,
    pub row_labels: Vec<String>,
    pub col_labels: Vec<String>,
    pub x_label: String,
    pub y_label: String,
    pub value_label: String,
    pub caption: String,
}

/// Blue (negative) - white - red (positive), `v` in [-1, 1].
fn diverging(v: f64) -> RGBColor {
    let v = v.clamp(-1.0, 1.0);
    let (r, g, b) = if v >= 0.0 {
        (1.0, 1.0 - 0.8 * v, 1.0 - 0.85 * v)
    } else {
        (1.0 + 0.85 * v, 1.0 + 0.6 * v, 1.0)
    };
    RGBColor((r * 255.0) as u8, (g * 255.0) as u8, (b * 255.0) as u8)
}

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, h: &Heatmap) -> Result<()> {
    let e = err::<String>(&h.title);
    let se = |x: DrawingAreaErrorKind<DB::ErrorType>| e(x.to_string());
    root.fill(&WHITE).map_err(se)?;
    let (w, ht) = root.dim_in_pixel();
    let (area, foot) = root.split_vertically(ht - 24);
    foot.draw_text(
        &h.caption,
        &(FONT, 12).into_font().color(&RGBColor(90, 90, 90)),
        (10, 4),
    )
    .map_err(se)?;
    let (main, bar) = area.split_horizontally(w - 90);
    let nr = h.values.len();
    let nc = h.values.first().map(Vec::len).unwrap_or(0);
    let vmax = h
        .values
        .iter()
        .flatten()
        .filter(|v| v.is_finite())
        .fold(0.0f64, |m, v| m.max(v.abs()))
        .max(1e-12);
    let longest = h
        .col_labels
        .iter()
        .map(|s| s.chars().count())
        .max()
        .unwrap_or(1);
    let mut chart = ChartBuilder::on(&main)
        .caption(&h.title, (FONT, 20))
        .margin(10)
        .x_label_area_size((longest as u32 * 8 + 50).clamp(50, 220))
        .y_label_area_size(70)
        // Segmented axes put each label at the centre of its cell.
        .build_cartesian_2d(
            (0..nc.max(1) - 1).into_segmented(),
            (0..nr.max(1) - 1).into_segmented(),
        )
        .map_err(se)?;
    let cols = h.col_labels.clone();
    let rows = h.row_labels.clone();
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(nc.max(1))
        .y_labels(nr.max(1))
        // x labels are drawn below by hand: plotters misplaces rotated tick labels.
        .x_label_formatter(&|_| String::new())
        .y_label_formatter(&|i| match i {
            SegmentValue::CenterOf(i) => rows.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .axis_desc_style((FONT, 14))
        .y_label_style((FONT, 12))
        .x_desc(&h.x_label)
        .y_desc(&h.y_label)
        .draw()
        .map_err(se)?;
    chart
        .draw_series(h.values.iter().enumerate().flat_map(|(r, row)| {
            row.iter().enumerate().map(move |(c, &v)| {
                let col = if v.is_finite() {
                    diverging(v / vmax)
                } else {
                    RGBColor(200, 200, 200)
                };
                Rectangle::new(
                    [
                        (SegmentValue::Exact(c), SegmentValue::Exact(r)),
                        (SegmentValue::Exact(c + 1), SegmentValue::Exact(r + 1)),
                    ],
                    col.filled(),
                )
            })
        }))
        .map_err(se)?;
    let style = TextStyle::from((FONT, 12).into_font().transform(FontTransform::Rotate90))
        .pos(Pos::new(HPos::Left, VPos::Center));
    for (c, label) in cols.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(SegmentValue::CenterOf(c), SegmentValue::Exact(0)));
        main.draw(&Text::new(label.clone(), (px - 6, py + 8), style.clone()))
            .map_err(se)?;
    }
    // Colour bar.
    let mut cb = ChartBuilder::on(&bar)
        .margin_top(40)
        .margin_bottom(60)
        .margin_right(10)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..1.0, -vmax..vmax)
        .map_err(se)?;
    cb.configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_labels(5)
        .y_desc(&h.value_label)
        .label_style((FONT, 11))
        .draw()
        .map_err(se)?;
    let steps = 64;
    cb.draw_series((0..steps).map(|i| {
        let a = -vmax + 2.0 * vmax * i as f64 / steps as f64;
        let b = -vmax + 2.0 * vmax * (i + 1) as f64 / steps as f64;
        Rectangle::new(
            [(0.0, a), (1.0, b)],
            diverging((a + b) / 2.0 / vmax).filled(),
        )
    }))
    .map_err(se)?;
    Ok(())
}

/// Writes `stem.png` and `stem.svg`; the size grows with the number of cells.
pub fn save_heatmap(h: &Heatmap, stem: &Path) -> Result<Vec<PathBuf>> {
    let nc = h.values.first().map(Vec::len).unwrap_or(1) as u32;
    let nr = h.values.len() as u32;
    // Wide enough for the title (20 px font, ~10 px a character) and most of the caption.
    let title_w = h.title.chars().count() as u32 * 11 + 40;
    let caption_w = (h.caption.chars().count() as u32 * 6 + 20).min(1400);
    let size = (
        (nc * 28 + 260).max(title_w).max(caption_w).clamp(520, 1800),
        (nr * 24 + 220).clamp(360, 1400),
    );
    render_pair!(stem, size, &h.title, |root| {
        draw(&root, h)?;
    })
}
