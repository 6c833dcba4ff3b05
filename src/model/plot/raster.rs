//! A [`Scene`] drawn into pixels, for the PNG. No anti-aliasing: charts are axis-aligned
//! rectangles, polylines and a pixel font, and hard edges keep the PNG small.

use super::font;
use super::scene::{Anchor, Color, Label, Scene, Shape, ADVANCE_PX, CAP_PX};

/// An RGB image, 8 bits a channel, rows top to bottom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    /// Width, pixels.
    pub width: u32,
    /// Height, pixels.
    pub height: u32,
    /// `width * height` pixels of three bytes each.
    pub rgb: Vec<u8>,
}

impl Bitmap {
    /// An image of one colour.
    pub fn new(width: u32, height: u32, fill: [u8; 3]) -> Bitmap {
        let rgb = fill.repeat(width as usize * height as usize);
        Bitmap { width, height, rgb }
    }

    /// The pixel at `(x, y)`, if inside.
    #[cfg(test)]
    pub fn pixel(&self, x: u32, y: u32) -> Option<[u8; 3]> {
        if x >= self.width || y >= self.height {
            return None;
        }
        let i = (y as usize * self.width as usize + x as usize) * 3;
        Some([self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]])
    }

    /// Paints pixel `(x, y)` with `c` at `opacity`; outside the image, nothing.
    fn paint(&mut self, x: i64, y: i64, c: Color, opacity: f64) {
        if x < 0 || y < 0 || x >= i64::from(self.width) || y >= i64::from(self.height) {
            return;
        }
        let i = (y as usize * self.width as usize + x as usize) * 3;
        let a = opacity.clamp(0.0, 1.0);
        for (k, src) in [c.r, c.g, c.b].into_iter().enumerate() {
            let dst = f64::from(self.rgb[i + k]);
            self.rgb[i + k] = (f64::from(src) * a + dst * (1.0 - a)).round() as u8;
        }
    }
}

/// The scene in pixels, on a white page.
pub fn render(scene: &Scene) -> Bitmap {
    let mut img = Bitmap::new(scene.width, scene.height, [255, 255, 255]);
    for shape in &scene.shapes {
        match shape {
            Shape::Rect {
                x,
                y,
                w,
                h,
                fill,
                opacity,
            } => rect(&mut img, (*x, *y, *w, *h), *fill, *opacity),
            Shape::Line { points, stroke, width } => {
                for pair in points.windows(2) {
                    segment(&mut img, pair[0], pair[1], *stroke, *width);
                }
            }
            Shape::Text(label) => draw_text(&mut img, label),
        }
    }
    img
}

/// A filled rectangle; one that is thinner than a pixel still covers one, so that a
/// millisecond of downtime on an hour's axis stays visible.
fn rect(img: &mut Bitmap, (x, y, w, h): (f64, f64, f64, f64), c: Color, opacity: f64) {
    if !(w > 0.0 && h > 0.0) {
        return;
    }
    let span = |from: f64, len: f64| {
        let a = from.round() as i64;
        (a, ((from + len).round() as i64).max(a + 1))
    };
    let (x0, x1) = span(x, w);
    let (y0, y1) = span(y, h);
    let clip = |v: i64, max: u32| v.clamp(0, i64::from(max));
    for py in clip(y0, img.height)..clip(y1, img.height) {
        for px in clip(x0, img.width)..clip(x1, img.width) {
            img.paint(px, py, c, opacity);
        }
    }
}

/// A line segment drawn as a square brush stepped every half pixel.
fn segment(img: &mut Bitmap, (ax, ay): (f64, f64), (bx, by): (f64, f64), c: Color, width: f64) {
    let side = width.round().max(1.0) as i64;
    let len = (bx - ax).hypot(by - ay);
    if !len.is_finite() {
        return;
    }
    let steps = (len * 2.0).ceil().max(1.0) as u64;
    for k in 0..=steps {
        let t = k as f64 / steps as f64;
        let (cx, cy) = (ax + (bx - ax) * t, ay + (by - ay) * t);
        let (left, top) = (
            (cx - side as f64 / 2.0).round() as i64,
            (cy - side as f64 / 2.0).round() as i64,
        );
        for py in top..top + side {
            for px in left..left + side {
                img.paint(px, py, c, 1.0);
            }
        }
    }
}

fn draw_text(img: &mut Bitmap, label: &Label) {
    let Label {
        x,
        y,
        ref text,
        scale,
        color: c,
        anchor,
        vertical,
    } = *label;
    let s = f64::from(scale.max(1));
    let width = super::scene::text_width(text, scale.max(1));
    let start = match anchor {
        Anchor::Start => 0.0,
        Anchor::Middle => -width / 2.0,
        Anchor::End => -width,
    };
    let top = -f64::from(CAP_PX) * s / 2.0;
    for (i, ch) in text.chars().enumerate() {
        let left = start + i as f64 * f64::from(ADVANCE_PX) * s;
        for row in 0..font::GLYPH_H {
            for col in (0..font::GLYPH_W).filter(|&col| font::ink(ch, col, row)) {
                for sy in 0..scale.max(1) {
                    for sx in 0..scale.max(1) {
                        // Offsets along and across the text, from its anchor point.
                        let along = left + f64::from(col) * s + f64::from(sx);
                        let across = top + f64::from(row) * s + f64::from(sy);
                        let (px, py) = if vertical {
                            (x + across, y - along - 1.0)
                        } else {
                            (x + along, y + across)
                        };
                        img.paint(px.floor() as i64, py.floor() as i64, c, 1.0);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RED: Color = Color::rgb(255, 0, 0);

    fn scene(shapes: Vec<Shape>) -> Scene {
        Scene {
            width: 40,
            height: 20,
            shapes,
        }
    }

    fn inked(img: &Bitmap) -> usize {
        img.rgb.chunks_exact(3).filter(|p| p != &[255, 255, 255]).count()
    }

    #[test]
    fn test_rect_covers_its_pixels_and_blends_by_opacity() {
        let img = render(&scene(vec![
            Shape::Rect {
                x: 2.0,
                y: 3.0,
                w: 4.0,
                h: 2.0,
                fill: RED,
                opacity: 1.0,
            },
            Shape::Rect {
                x: 10.0,
                y: 0.0,
                w: 1.0,
                h: 1.0,
                fill: RED,
                opacity: 0.5,
            },
        ]));
        assert_eq!(img.pixel(2, 3), Some([255, 0, 0]));
        assert_eq!(img.pixel(5, 4), Some([255, 0, 0]));
        assert_eq!(img.pixel(6, 4), Some([255, 255, 255]));
        assert_eq!(img.pixel(10, 0), Some([255, 128, 128]));
        assert_eq!(inked(&img), 9);
    }

    #[test]
    fn test_a_hairline_rect_still_covers_a_pixel() {
        let img = render(&scene(vec![Shape::Rect {
            x: 5.2,
            y: 0.0,
            w: 0.01,
            h: 20.0,
            fill: RED,
            opacity: 1.0,
        }]));
        assert_eq!(inked(&img), 20);
    }

    #[test]
    fn test_shapes_outside_the_image_are_clipped() {
        let img = render(&scene(vec![
            Shape::Rect {
                x: -50.0,
                y: -50.0,
                w: 500.0,
                h: 500.0,
                fill: RED,
                opacity: 1.0,
            },
            Shape::Line {
                points: vec![(-100.0, -100.0), (100.0, 100.0)],
                stroke: RED,
                width: 3.0,
            },
        ]));
        assert_eq!(inked(&img), 40 * 20);
    }

    #[test]
    fn test_a_line_joins_its_ends() {
        let img = render(&scene(vec![Shape::Line {
            points: vec![(1.0, 10.0), (30.0, 10.0)],
            stroke: RED,
            width: 1.0,
        }]));
        assert!((1..=30).all(|x| img.pixel(x, 10) == Some([255, 0, 0]) || img.pixel(x, 9) == Some([255, 0, 0])));
    }

    #[test]
    fn test_text_is_drawn_with_the_font_and_anchored() {
        let text = |anchor, vertical| {
            let label = Label::new(20.0, 10.0, "L").color(RED).anchor(anchor);
            Shape::Text(if vertical { label.vertical() } else { label })
        };
        let start = render(&scene(vec![text(Anchor::Start, false)]));
        // `L` has 7 + 4 inked pixels; its left column starts at x and its middle is at y.
        assert_eq!(inked(&start), 11);
        assert_eq!(start.pixel(20, 7), Some([255, 0, 0]));
        assert_eq!(start.pixel(24, 12), Some([255, 0, 0]));
        let end = render(&scene(vec![text(Anchor::End, false)]));
        assert_eq!(end.pixel(15, 7), Some([255, 0, 0]));
        let up = render(&scene(vec![text(Anchor::Start, true)]));
        assert_eq!(inked(&up), 11);
    }
}
