//! What a chart is made of once laid out: rectangles, polylines and text in pixel
//! coordinates (origin top left, y down). The SVG writer and the rasterizer both read a
//! [`Scene`], so the two files of one figure cannot disagree.

/// An sRGB colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Color {
    /// Red.
    pub r: u8,
    /// Green.
    pub g: u8,
    /// Blue.
    pub b: u8,
}

impl Color {
    /// A colour from its components.
    pub const fn rgb(r: u8, g: u8, b: u8) -> Color {
        Color { r, g, b }
    }

    /// `#rrggbb`, as SVG wants it.
    pub fn hex(self) -> String {
        format!("#{:02x}{:02x}{:02x}", self.r, self.g, self.b)
    }

    /// The `i`-th colour of [`PALETTE`], cycling.
    pub fn series(i: usize) -> Color {
        PALETTE[i % PALETTE.len()]
    }
}

/// Page background.
pub const WHITE: Color = Color::rgb(255, 255, 255);
/// Titles, labels, axes.
pub const INK: Color = Color::rgb(40, 40, 40);
/// Grid lines.
pub const GRID: Color = Color::rgb(225, 225, 225);
/// Secondary text (notes).
pub const MUTED: Color = Color::rgb(110, 110, 110);

/// Series colours, picked to stay apart from each other on white and for common colour
/// blindness; eight covers every chart that caps its series at eight.
pub const PALETTE: [Color; 8] = [
    Color::rgb(31, 119, 180),
    Color::rgb(255, 127, 14),
    Color::rgb(44, 160, 44),
    Color::rgb(148, 103, 189),
    Color::rgb(140, 86, 75),
    Color::rgb(227, 119, 194),
    Color::rgb(23, 190, 207),
    Color::rgb(188, 189, 34),
];

/// Where a text's `x` is: its left end, its middle or its right end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anchor {
    /// `x` is the left end.
    Start,
    /// `x` is the middle.
    Middle,
    /// `x` is the right end.
    End,
}

/// One drawing operation, in pixels.
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    /// A filled rectangle; `opacity` below 1 lets what is under it show.
    Rect {
        /// Left.
        x: f64,
        /// Top.
        y: f64,
        /// Width.
        w: f64,
        /// Height.
        h: f64,
        /// Fill.
        fill: Color,
        /// 0 (invisible) to 1 (opaque).
        opacity: f64,
    },
    /// A polyline (two points: a line segment).
    Line {
        /// The vertices, in order.
        points: Vec<(f64, f64)>,
        /// Colour.
        stroke: Color,
        /// Width, pixels.
        width: f64,
    },
    /// A line of text.
    Text(Label),
}

/// A line of text in the built-in font: glyphs 5 by 7 pixels on a 6-pixel advance, times
/// `scale`. Built with [`Label::new`] and adjusted by its setters.
#[derive(Debug, Clone, PartialEq)]
pub struct Label {
    /// Anchor point, horizontal.
    pub x: f64,
    /// Middle of the capitals.
    pub y: f64,
    /// The text (characters outside printable ASCII show as `?` in the raster).
    pub text: String,
    /// Integer magnification of the 5x7 glyphs.
    pub scale: u32,
    /// Colour.
    pub color: Color,
    /// Which part of the text is at `x`.
    pub anchor: Anchor,
    /// Turned a quarter anticlockwise (reads bottom to top), about `(x, y)`.
    pub vertical: bool,
}

impl Label {
    /// `text` starting at `x`, its capitals centred on `y`: scale 1, in [`INK`], horizontal.
    pub fn new(x: f64, y: f64, text: impl Into<String>) -> Label {
        Label {
            x,
            y,
            text: text.into(),
            scale: 1,
            color: INK,
            anchor: Anchor::Start,
            vertical: false,
        }
    }

    /// Magnified `scale` times.
    pub fn scale(self, scale: u32) -> Label {
        Label { scale, ..self }
    }

    /// In `color`.
    pub fn color(self, color: Color) -> Label {
        Label { color, ..self }
    }

    /// With `anchor` at `x`.
    pub fn anchor(self, anchor: Anchor) -> Label {
        Label { anchor, ..self }
    }

    /// Reading bottom to top.
    pub fn vertical(self) -> Label {
        Label { vertical: true, ..self }
    }
}

/// A laid-out figure.
#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    /// Width, pixels.
    pub width: u32,
    /// Height, pixels.
    pub height: u32,
    /// Drawn in order, later over earlier.
    pub shapes: Vec<Shape>,
}

/// Horizontal advance of one character at scale 1, pixels.
pub const ADVANCE_PX: u32 = 6;
/// Height of the capitals at scale 1, pixels.
pub const CAP_PX: u32 = 7;

/// Width of `text` at `scale`, pixels.
pub fn text_width(text: &str, scale: u32) -> f64 {
    let n = text.chars().count() as f64;
    (n * f64::from(ADVANCE_PX) - 1.0).max(0.0) * f64::from(scale)
}

/// `text` cut to at most `max_chars` characters, ending in `~` when cut.
pub fn fit(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        return text.to_string();
    }
    let mut s: String = text.chars().take(max_chars.saturating_sub(1)).collect();
    s.push('~');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_fit_cuts_long_text_and_marks_it() {
        assert_eq!(fit("short", 8), "short");
        assert_eq!(fit("a-very-long-name", 8), "a-very-~");
        assert_eq!(fit("a-very-long-name", 8).chars().count(), 8);
    }

    #[test]
    fn test_text_width_counts_the_advance_without_the_last_gap() {
        assert_eq!(text_width("ab", 1), 11.0);
        assert_eq!(text_width("ab", 2), 22.0);
        assert_eq!(text_width("", 2), 0.0);
    }

    #[test]
    fn test_hex_is_lowercase_rrggbb() {
        assert_eq!(Color::rgb(255, 8, 171).hex(), "#ff08ab");
    }
}
