//! The demo model's scorer, ported from tools/demo-model/score.py: which colour and which shape
//! is the object in a generated 64x64 image? (Validated at 100% on ground-truth renders in
//! Python; the algorithm is described there step by step.)

/// The palette of tools/demo-model/data.py.
pub const COLOURS: [(&str, [f64; 3]); 6] = [
    ("red", [225.0, 25.0, 25.0]),
    ("yellow", [245.0, 215.0, 30.0]),
    ("green", [30.0, 170.0, 50.0]),
    ("cyan", [30.0, 200.0, 215.0]),
    ("blue", [35.0, 70.0, 225.0]),
    ("purple", [170.0, 40.0, 200.0]),
];
/// Shapes, in the scorer's tie order.
pub const SHAPES: [&str; 3] = ["square", "circle", "triangle"];
/// Backgrounds.
pub const BACKGROUNDS: [(&str, [f64; 3]); 3] = [
    ("white", [255.0; 3]),
    ("black", [0.0; 3]),
    ("gray", [128.0; 3]),
];

const BORDER: usize = 2;
const THRESHOLD: f64 = 60.0;
const MIN_PIXELS: usize = 30;

/// What the scorer saw.
#[derive(Debug, Clone)]
pub struct Score {
    pub colour: Option<&'static str>,
    pub shape: Option<&'static str>,
    pub background: &'static str,
    /// Inclusive bounding box (x0, y0, x1, y1) of the object.
    pub bbox: Option<(usize, usize, usize, usize)>,
}

fn nearest<const N: usize>(rgb: [f64; 3], table: &[(&'static str, [f64; 3]); N]) -> &'static str {
    let d = |c: &[f64; 3]| (0..3).map(|i| (c[i] - rgb[i]).powi(2)).sum::<f64>();
    let mut best = table[0];
    for e in table.iter() {
        if d(&e.1) < d(&best.1) {
            best = *e;
        }
    }
    best.0
}

/// numpy's median of one channel.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn median_rgb(px: &[[f64; 3]]) -> [f64; 3] {
    [0, 1, 2].map(|c| median(px.iter().map(|p| p[c]).collect()))
}

/// Scores an RGB8 image (`w * h * 3` bytes, row-major).
pub fn score(data: &[u8], w: usize, h: usize) -> Score {
    let px = |x: usize, y: usize| {
        let i = (y * w + x) * 3;
        [data[i] as f64, data[i + 1] as f64, data[i + 2] as f64]
    };
    let mut frame = Vec::new();
    for y in 0..h {
        for x in 0..w {
            if x < BORDER || y < BORDER || x >= w - BORDER || y >= h - BORDER {
                frame.push(px(x, y));
            }
        }
    }
    let bg = median_rgb(&frame);
    let mask: Vec<bool> = (0..h * w)
        .map(|i| {
            let p = px(i % w, i / w);
            (0..3).map(|c| (p[c] - bg[c]).powi(2)).sum::<f64>().sqrt() > THRESHOLD
        })
        .collect();
    // Largest 4-connected component (first found in row-major order on ties).
    let mut seen = vec![false; h * w];
    let mut best: Vec<usize> = Vec::new();
    for start in 0..h * w {
        if !mask[start] || seen[start] {
            continue;
        }
        let mut comp = Vec::new();
        let mut stack = vec![start];
        seen[start] = true;
        while let Some(i) = stack.pop() {
            comp.push(i);
            let (x, y) = (i % w, i / w);
            let mut push = |j: usize| {
                if mask[j] && !seen[j] {
                    seen[j] = true;
                    stack.push(j);
                }
            };
            if y > 0 {
                push(i - w);
            }
            if y + 1 < h {
                push(i + w);
            }
            if x > 0 {
                push(i - 1);
            }
            if x + 1 < w {
                push(i + 1);
            }
        }
        if comp.len() > best.len() {
            best = comp;
        }
    }
    let background = nearest(bg, &BACKGROUNDS);
    if best.len() < MIN_PIXELS {
        return Score {
            colour: None,
            shape: None,
            background,
            bbox: None,
        };
    }
    let obj: Vec<[f64; 3]> = best.iter().map(|&i| px(i % w, i / w)).collect();
    let colour = nearest(median_rgb(&obj), &COLOURS);
    let (x0, x1) = (
        best.iter().map(|i| i % w).min().unwrap(),
        best.iter().map(|i| i % w).max().unwrap(),
    );
    let (y0, y1) = (
        best.iter().map(|i| i / w).min().unwrap(),
        best.iter().map(|i| i / w).max().unwrap(),
    );
    let (bw, bh) = (x1 - x0 + 1, y1 - y0 + 1);
    let mut in_obj = vec![false; bw * bh];
    for &i in &best {
        in_obj[(i / w - y0) * bw + (i % w - x0)] = true;
    }
    let mut best_shape = (SHAPES[0], -1.0);
    for name in SHAPES {
        let (mut inter, mut union) = (0usize, 0usize);
        for y in 0..bh {
            for x in 0..bw {
                let u = (x as f64 + 0.5) / bw as f64;
                let v = (y as f64 + 0.5) / bh as f64;
                let t = match name {
                    "square" => true,
                    "circle" => (u - 0.5).powi(2) + (v - 0.5).powi(2) <= 0.25,
                    _ => (u - 0.5).abs() <= 0.5 * v,
                };
                let o = in_obj[y * bw + x];
                inter += usize::from(t && o);
                union += usize::from(t || o);
            }
        }
        let iou = inter as f64 / union.max(1) as f64;
        if iou > best_shape.1 {
            best_shape = (name, iou);
        }
    }
    Score {
        colour: Some(colour),
        shape: Some(best_shape.0),
        background,
        bbox: Some((x0, y0, x1, y1)),
    }
}
