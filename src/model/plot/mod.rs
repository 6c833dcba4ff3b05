//! Charts as SVG and PNG, with no plotting or image dependency.
//!
//! A figure is laid out once, by a [`Chart`], into a [`Scene`] of rectangles, polylines and
//! text in pixels; [`to_svg`] writes that scene as text and [`to_png`] rasterizes it with a
//! built-in 5x7 font and encodes it. The two files of a figure therefore show the same
//! thing. Use [`Chart`] for anything with two axes; build a [`Scene`] by hand only for a
//! figure that has none.
//!
//! * [`chart`]: axes, ticks, series (thinned to a few points per pixel column), bands, bars,
//!   the legend column.
//! * [`scene`]: the shapes and colours.
//! * `svg`, `raster` and `font`, `png` and `deflate`: the two outputs.
//!
//! Sizes are bounded by the picture, not the data: a chart is 1000 by 560 pixels, a series at
//! most four points per pixel column, and the PNG is compressed (fixed-code deflate matching
//! the previous pixel and the row above), typically tens of kilobytes.

pub mod chart;
mod deflate;
mod font;
mod png;
mod raster;
pub mod scene;
mod svg;

pub use chart::{Axis, Chart, Swatch, Ticks};
pub use scene::{Anchor, Color, Label, Scene, Shape};

/// The scene as an SVG document.
pub fn to_svg(scene: &Scene) -> String {
    svg::render(scene)
}

/// The scene as a PNG file.
pub fn to_png(scene: &Scene) -> Vec<u8> {
    png::encode(&raster::render(scene))
}

#[cfg(test)]
pub(crate) use png::tests::{decode as decode_png, read_chunks as png_chunks};
