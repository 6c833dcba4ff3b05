//! A [`Scene`] as SVG text: one element per shape, coordinates to a tenth of a pixel (no
//! figure needs finer, and it keeps files small and byte-for-byte reproducible).

use std::fmt::Write;

use super::scene::{Anchor, Label, Scene, Shape, CAP_PX};

/// The SVG document.
pub fn render(scene: &Scene) -> String {
    let mut out = String::new();
    let (w, h) = (scene.width, scene.height);
    // `write!` into a String cannot fail; the results are discarded for that reason only.
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="monospace">"#
    );
    let _ = writeln!(out, r##"<rect x="0" y="0" width="{w}" height="{h}" fill="#ffffff"/>"##);
    for shape in &scene.shapes {
        match shape {
            Shape::Rect {
                x,
                y,
                w,
                h,
                fill,
                opacity,
            } => {
                let _ = write!(
                    out,
                    r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}""#,
                    x,
                    y,
                    // As in the raster, nothing thinner than a pixel.
                    w.max(1.0),
                    h.max(1.0),
                    fill.hex()
                );
                if *opacity < 1.0 {
                    let _ = write!(out, r#" fill-opacity="{:.2}""#, opacity);
                }
                out.push_str("/>\n");
            }
            Shape::Line { points, stroke, width } => {
                if points.len() < 2 {
                    continue;
                }
                out.push_str(r#"<polyline points=""#);
                for (i, (x, y)) in points.iter().enumerate() {
                    let sep = if i == 0 { "" } else { " " };
                    let _ = write!(out, "{sep}{x:.1},{y:.1}");
                }
                let _ = writeln!(
                    out,
                    r#"" fill="none" stroke="{}" stroke-width="{:.1}" stroke-linejoin="round"/>"#,
                    stroke.hex(),
                    width
                );
            }
            Shape::Text(Label {
                x,
                y,
                text,
                scale,
                color,
                anchor,
                vertical,
            }) => {
                let anchor = match anchor {
                    Anchor::Start => "start",
                    Anchor::Middle => "middle",
                    Anchor::End => "end",
                };
                // A monospace font at 10 px per scale step advances about 6 px a character,
                // as the raster font does; the baseline sits half a capital below `y`.
                let size = 10 * scale;
                let baseline = y + f64::from(CAP_PX * scale) / 2.0;
                let _ = write!(
                    out,
                    r#"<text x="{x:.1}" y="{baseline:.1}" font-size="{size}" fill="{}" text-anchor="{anchor}""#,
                    color.hex()
                );
                if *vertical {
                    let _ = write!(out, r#" transform="rotate(-90 {x:.1} {y:.1})""#);
                }
                let _ = writeln!(out, ">{}</text>", escape(text));
            }
        }
    }
    out.push_str("</svg>\n");
    out
}

/// `text` safe inside an XML element.
fn escape(text: &str) -> String {
    let mut s = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => s.push_str("&amp;"),
            '<' => s.push_str("&lt;"),
            '>' => s.push_str("&gt;"),
            '"' => s.push_str("&quot;"),
            // XML 1.0 forbids most control characters even escaped.
            c if c.is_control() => s.push('?'),
            c => s.push(c),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::super::scene::{Color, INK};
    use super::*;

    #[test]
    fn test_every_shape_becomes_one_element() {
        let scene = Scene {
            width: 100,
            height: 50,
            shapes: vec![
                Shape::Rect {
                    x: 1.0,
                    y: 2.0,
                    w: 3.0,
                    h: 4.0,
                    fill: Color::rgb(1, 2, 3),
                    opacity: 0.25,
                },
                Shape::Line {
                    points: vec![(0.0, 0.0), (10.0, 5.55)],
                    stroke: INK,
                    width: 1.5,
                },
                Shape::Text(
                    Label::new(5.0, 6.0, "a<b & \"c\"")
                        .scale(2)
                        .anchor(Anchor::Middle)
                        .vertical(),
                ),
            ],
        };
        let svg = render(&scene);
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"100\" height=\"50\""));
        assert!(svg.ends_with("</svg>\n"));
        assert!(
            svg.contains(r##"<rect x="1.0" y="2.0" width="3.0" height="4.0" fill="#010203" fill-opacity="0.25"/>"##)
        );
        assert!(svg.contains(r#"<polyline points="0.0,0.0 10.0,5.5""#) || svg.contains(r#"points="0.0,0.0 10.0,5.6""#));
        assert!(svg.contains("a&lt;b &amp; &quot;c&quot;</text>"));
        assert!(svg.contains(r#"font-size="20""#));
        assert!(svg.contains(r#"transform="rotate(-90 5.0 6.0)""#));
    }

    #[test]
    fn test_escape_replaces_control_characters() {
        assert_eq!(escape("a\u{1}b"), "a?b");
    }
}
