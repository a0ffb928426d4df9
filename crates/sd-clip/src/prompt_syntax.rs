//! AUTOMATIC1111's prompt syntax, as its `modules/prompt_parser.py` and
//! `modules/extra_networks.py` read prompts (webui v1.6 to v1.10), written anew in Rust.
//!
//! The order is A1111's:
//! 1. [`extract_extra_networks`]: `<lora:NAME:WEIGHT>` and other `<kind:args>` tags are taken out
//!    of the prompt (the caller loads what they name).
//! 2. [`check_no_and`]: `AND` (composable diffusion) is refused.
//! 3. [`prompt_schedule`]: prompt editing `[from:to:when]`, `[to:when]`, `[from::when]` and
//!    alternation `[a|b]` give one plain prompt per range of steps
//!    (`get_learned_conditioning_prompt_schedules`).
//! 4. [`parse_prompt_attention`]: each of those prompts becomes text fragments with weights:
//!    `(text)` × 1.1, `[text]` ÷ 1.1, `(text:1.5)`, nesting, escapes `\(` `\)` `\[` `\]` `\\`, and
//!    `BREAK`.
//!
//! Every function accepts any string without panicking (property-tested).
//!
//! Where A1111 itself is not deterministic: its schedule grammar is ambiguous when a bracket group
//! that could be an edit or an alternation is directly followed by another bracket character
//! (`[a:b:1]]`, `[a:b:1]:`); lark's Earley parser then picks one of the readings depending on
//! Python's per-process string hashing, so the same prompt gives an edit in one run of the webui
//! and literal text in another. Here such a group is always read as the edit/alternation.

use std::collections::BTreeSet;

use sd_core::{Error, Result};

/// Nesting depth beyond which a bracket group is read as literal text (A1111's parser hits
/// Python's recursion limit on such prompts).
const MAX_DEPTH: usize = 100;

/// One piece of a prompt with its attention weight, as `parse_prompt_attention` returns them.
///
/// A1111 marks `BREAK` as the text `"BREAK"` with weight `-1`; see [`Fragment::is_break`]. Its
/// parser multiplies that marker's weight too when the `BREAK` sits inside brackets, after which it
/// is no longer a break but the word "BREAK" with a negative weight. That is reproduced.
#[derive(Debug, Clone, PartialEq)]
pub struct Fragment {
    /// The text (escapes resolved).
    pub text: String,
    /// The product of the bracket multipliers around it.
    pub weight: f64,
}

impl Fragment {
    /// True for the `BREAK` marker that starts a new 75-token chunk.
    pub fn is_break(&self) -> bool {
        self.text == "BREAK" && self.weight == -1.0
    }
}

/// Python's `\s` for str patterns: Unicode whitespace, including the separators U+001C..U+001F.
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `\w` (what `\b` looks at).
fn py_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// One token of A1111's `re_attention`.
enum AttnToken<'a> {
    /// `\(`, `\)`, `\[`, `\]`, `\\` (the escaped character) or a lone `\` (empty text).
    Escape(&'a str),
    OpenRound,
    OpenSquare,
    /// `:1.5)` with the number's text.
    Weight {
        all: &'a str,
        number: &'a str,
    },
    CloseRound,
    CloseSquare,
    /// A run of other characters, or a lone `:`.
    Text(&'a str),
}

/// `:\s*([+-]?[.\d]+)\s*\)` at `s` (which starts with `:`): (length, number).
fn match_weight(s: &str) -> Option<(usize, &str)> {
    let skip_space = |mut i: usize| {
        while let Some(c) = s[i..].chars().next().filter(|c| py_space(*c)) {
            i += c.len_utf8();
        }
        i
    };
    let mut i = skip_space(1);
    let start = i;
    if matches!(s.as_bytes().get(i), Some(b'+' | b'-')) {
        i += 1;
    }
    let digits = i;
    while matches!(s.as_bytes().get(i), Some(b'.' | b'0'..=b'9')) {
        i += 1;
    }
    if i == digits {
        return None;
    }
    let number = &s[start..i];
    i = skip_space(i);
    (s.as_bytes().get(i) == Some(&b')')).then_some((i + 1, number))
}

fn next_attn_token(s: &str) -> (AttnToken<'_>, usize) {
    let b = s.as_bytes();
    match b[0] {
        b'\\' => match b.get(1) {
            Some(b'(' | b')' | b'[' | b']' | b'\\') => (AttnToken::Escape(&s[1..2]), 2),
            _ => (AttnToken::Escape(""), 1),
        },
        b'(' => (AttnToken::OpenRound, 1),
        b'[' => (AttnToken::OpenSquare, 1),
        b')' => (AttnToken::CloseRound, 1),
        b']' => (AttnToken::CloseSquare, 1),
        b':' => match match_weight(s) {
            Some((n, number)) => (
                AttnToken::Weight {
                    all: &s[..n],
                    number,
                },
                n,
            ),
            None => (AttnToken::Text(&s[..1]), 1),
        },
        _ => {
            let n = b
                .iter()
                .position(|c| matches!(c, b'\\' | b'(' | b')' | b'[' | b']' | b':'))
                .unwrap_or(b.len());
            (AttnToken::Text(&s[..n]), n)
        }
    }
}

/// `re.split(r"\s*\bBREAK\b\s*", text)`.
pub fn split_break(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut last, mut search) = (0, 0);
    while let Some(rel) = s[search..].find("BREAK") {
        let b = search + rel;
        let e = b + "BREAK".len();
        let before_ok = s[..b].chars().next_back().is_none_or(|c| !py_word(c));
        let after_ok = s[e..].chars().next().is_none_or(|c| !py_word(c));
        if !(before_ok && after_ok) {
            search = b + 1;
            continue;
        }
        let mut start = b;
        for (i, c) in s[last..b].char_indices().rev() {
            if !py_space(c) {
                break;
            }
            start = last + i;
        }
        let mut end = e;
        for c in s[e..].chars() {
            if !py_space(c) {
                break;
            }
            end += c.len_utf8();
        }
        parts.push(&s[last..start]);
        last = end;
        search = end;
    }
    parts.push(&s[last..]);
    parts
}

/// A1111's `parse_prompt_attention`: the text split into fragments with weights.
///
/// `(a)` multiplies by 1.1, `[a]` by 1/1.1, `(a:w)` by w; closers without an opener are text,
/// openers left unclosed at the end still apply their 1.1 or 1/1.1; `\(` `\)` `\[` `\]` `\\` are
/// the literal characters (a lone `\` disappears); `BREAK` between words becomes a
/// [`Fragment::is_break`] marker; neighbours of equal weight are merged; an empty prompt gives one
/// empty fragment of weight 1. Weights are computed in f64 in A1111's order of multiplication, so
/// they are bit-identical to Python's.
///
/// The only error: a weight that is not a number, such as `(a:1.2.3)` (A1111 fails on it too).
///
/// ```
/// use sd_clip::prompt_syntax::parse_prompt_attention;
/// let f = parse_prompt_attention("an (important) word").unwrap();
/// assert_eq!(f[1].text, "important");
/// assert_eq!(f[1].weight, 1.1);
/// ```
pub fn parse_prompt_attention(text: &str) -> Result<Vec<Fragment>> {
    let mut res: Vec<Fragment> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply = |res: &mut Vec<Fragment>, from: usize, m: f64| {
        for f in res.iter_mut().skip(from) {
            f.weight *= m;
        }
    };
    let push = |res: &mut Vec<Fragment>, t: &str, w: f64| {
        res.push(Fragment {
            text: t.to_owned(),
            weight: w,
        })
    };
    let mut rest = text;
    while !rest.is_empty() {
        let (tok, n) = next_attn_token(rest);
        rest = &rest[n..];
        let plain = match tok {
            AttnToken::Escape(t) => {
                push(&mut res, t, 1.0);
                continue;
            }
            AttnToken::OpenRound => {
                round.push(res.len());
                continue;
            }
            AttnToken::OpenSquare => {
                square.push(res.len());
                continue;
            }
            AttnToken::Weight { all, number } => match round.pop() {
                Some(from) => {
                    let w: f64 = number.parse().map_err(|_| {
                        Error::invalid_argument(
                            "prompt",
                            format!("the weight `{number}` in `{all}`"),
                            "a number such as 1.5 (AUTOMATIC1111 fails on it too)",
                        )
                    })?;
                    multiply(&mut res, from, w);
                    continue;
                }
                None => all,
            },
            AttnToken::CloseRound => match round.pop() {
                Some(from) => {
                    multiply(&mut res, from, 1.1);
                    continue;
                }
                None => ")",
            },
            AttnToken::CloseSquare => match square.pop() {
                Some(from) => {
                    multiply(&mut res, from, 1.0 / 1.1);
                    continue;
                }
                None => "]",
            },
            AttnToken::Text(t) => t,
        };
        for (i, part) in split_break(plain).into_iter().enumerate() {
            if i > 0 {
                push(&mut res, "BREAK", -1.0);
            }
            push(&mut res, part, 1.0);
        }
    }
    for from in round {
        multiply(&mut res, from, 1.1);
    }
    for from in square {
        multiply(&mut res, from, 1.0 / 1.1);
    }
    if res.is_empty() {
        push(&mut res, "", 1.0);
    }
    let mut i = 0;
    while i + 1 < res.len() {
        if res[i].weight == res[i + 1].weight {
            let next = res.remove(i + 1);
            res[i].text.push_str(&next.text);
        } else {
            i += 1;
        }
    }
    Ok(res)
}

/// The plain prompt to use up to and including step `end_at_step` (1-based, as A1111 counts),
/// from [`prompt_schedule`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledPrompt {
    /// The last step (1-based) this prompt applies to; the last entry ends at `steps`.
    pub end_at_step: usize,
    /// The prompt text, with editing and alternation resolved (attention syntax kept).
    pub prompt: String,
}

/// A node of the schedule grammar: text kept as written, an edit, or an alternation.
#[derive(Debug)]
enum Node<'a> {
    Text(&'a str),
    Edit {
        before: Vec<Node<'a>>,
        after: Vec<Node<'a>>,
        number: &'a str,
    },
    Alternate(Vec<Vec<Node<'a>>>),
}

/// A recursive-descent reader of A1111's lark grammar (`schedule_parser`).
struct ScheduleParser<'a> {
    s: &'a str,
}

impl<'a> ScheduleParser<'a> {
    fn byte(&self, i: usize) -> Option<u8> {
        self.s.as_bytes().get(i).copied()
    }

    /// `\` must escape a character other than a newline (the grammar's `\\.`).
    fn escape_len(&self, i: usize) -> Option<usize> {
        match self.s[i + 1..].chars().next() {
            None | Some('\n') => None,
            Some(c) => Some(1 + c.len_utf8()),
        }
    }

    /// `prompt`: text, whitespace and groups up to one of `: | ) ]` or the end.
    fn prompt(&self, mut i: usize, depth: usize) -> Option<(Vec<Node<'a>>, usize)> {
        let mut nodes = Vec::new();
        let mut text_start = i;
        loop {
            let group = match self.byte(i) {
                None | Some(b':' | b'|' | b')' | b']') => {
                    if text_start < i {
                        nodes.push(Node::Text(&self.s[text_start..i]));
                    }
                    return Some((nodes, i));
                }
                Some(b'(') => self.round(i, depth + 1)?,
                Some(b'[') => self.square(i, depth + 1)?,
                Some(b'\\') => {
                    i += self.escape_len(i)?;
                    continue;
                }
                Some(_) => {
                    i += 1;
                    continue;
                }
            };
            if text_start < i {
                nodes.push(Node::Text(&self.s[text_start..i]));
            }
            nodes.extend(group.0);
            i = group.1;
            text_start = i;
        }
    }

    /// `"(" prompt ")" | "(" prompt ":" prompt ")"` at `i`.
    fn round(&self, i: usize, depth: usize) -> Option<(Vec<Node<'a>>, usize)> {
        if depth > MAX_DEPTH {
            return None;
        }
        let (a, j) = self.prompt(i + 1, depth)?;
        let mut nodes = vec![Node::Text("(")];
        nodes.extend(a);
        let j = match self.byte(j) {
            Some(b')') => j,
            Some(b':') => {
                let (c, k) = self.prompt(j + 1, depth)?;
                if self.byte(k) != Some(b')') {
                    return None;
                }
                nodes.push(Node::Text(":"));
                nodes.extend(c);
                k
            }
            _ => return None,
        };
        nodes.push(Node::Text(")"));
        Some((nodes, j + 1))
    }

    /// `"[" prompt "]"`, `scheduled` or `alternate` at `i`.
    fn square(&self, i: usize, depth: usize) -> Option<(Vec<Node<'a>>, usize)> {
        if depth > MAX_DEPTH {
            return None;
        }
        let (a, j) = self.prompt(i + 1, depth)?;
        match self.byte(j) {
            Some(b']') => {
                let mut nodes = vec![Node::Text("[")];
                nodes.extend(a);
                nodes.push(Node::Text("]"));
                Some((nodes, j + 1))
            }
            Some(b'|') => {
                let mut options = vec![a];
                let mut j = j;
                loop {
                    let (o, k) = self.prompt(j + 1, depth)?;
                    options.push(o);
                    match self.byte(k) {
                        Some(b'|') => j = k,
                        Some(b']') => return Some((vec![Node::Alternate(options)], k + 1)),
                        _ => return None,
                    }
                }
            }
            Some(b':') => {
                if let Some((number, k)) = self.number_tail(j + 1) {
                    let edit = Node::Edit {
                        before: Vec::new(),
                        after: a,
                        number,
                    };
                    return Some((vec![edit], k));
                }
                let (c, k) = self.prompt(j + 1, depth)?;
                if self.byte(k) != Some(b':') {
                    return None;
                }
                let (number, e) = self.number_tail(k + 1)?;
                let edit = Node::Edit {
                    before: a,
                    after: c,
                    number,
                };
                Some((vec![edit], e))
            }
            _ => None,
        }
    }

    fn skip_space(&self, mut i: usize) -> usize {
        while let Some(c) = self.s[i..].chars().next().filter(|c| py_space(*c)) {
            i += c.len_utf8();
        }
        i
    }

    /// `[WHITESPACE] NUMBER [WHITESPACE] "]"` at `i`: (number text, position after `]`).
    fn number_tail(&self, i: usize) -> Option<(&'a str, usize)> {
        let i = self.skip_space(i);
        let n = signed_number_len(&self.s[i..])?;
        let j = self.skip_space(i + n);
        (self.byte(j) == Some(b']')).then_some((&self.s[i..i + n], j + 1))
    }

    /// `start`: prompts and stray `[ ] ( ) :`; `None` when the grammar rejects the text (a `|`
    /// outside an alternation, a `\` at the end or before a newline).
    fn start(&self) -> Option<Vec<Node<'a>>> {
        let mut nodes = Vec::new();
        let (mut i, mut text_start) = (0, 0);
        while let Some(b) = self.byte(i) {
            let group = match b {
                b'[' => self.square(i, 1),
                b'(' => self.round(i, 1),
                b'|' => return None,
                b'\\' => {
                    i += self.escape_len(i)?;
                    continue;
                }
                _ => None,
            };
            match group {
                Some((g, j)) => {
                    if text_start < i {
                        nodes.push(Node::Text(&self.s[text_start..i]));
                    }
                    nodes.extend(g);
                    i = j;
                    text_start = j;
                }
                None => i += 1,
            }
        }
        if text_start < i {
            nodes.push(Node::Text(&self.s[text_start..i]));
        }
        Some(nodes)
    }
}

/// Length of lark's `SIGNED_NUMBER` at the start of `s` (Python regex alternation order:
/// `INT _EXP`, then `DECIMAL _EXP?`, then `INT`).
fn signed_number_len(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let digits = |i: usize| {
        b[i.min(b.len())..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count()
    };
    let exp = |i: usize| -> Option<usize> {
        if !matches!(b.get(i), Some(b'e' | b'E')) {
            return None;
        }
        let mut j = i + 1;
        if matches!(b.get(j), Some(b'+' | b'-')) {
            j += 1;
        }
        let d = digits(j);
        (d > 0).then_some(j + d - i)
    };
    let sign = usize::from(matches!(b.first(), Some(b'+' | b'-')));
    let int = digits(sign);
    if int > 0 {
        if let Some(e) = exp(sign + int) {
            return Some(sign + int + e);
        }
    }
    let decimal = if int > 0 && b.get(sign + int) == Some(&b'.') {
        Some(int + 1 + digits(sign + int + 1))
    } else if int == 0 && b.get(sign) == Some(&b'.') && digits(sign + 1) > 0 {
        Some(1 + digits(sign + 1))
    } else {
        None
    };
    if let Some(d) = decimal {
        return Some(sign + d + exp(sign + d).unwrap_or(0));
    }
    (int > 0).then_some(sign + int)
}

/// The step at which an edit switches, as A1111 computes it: a number with a `.` is a fraction of
/// `steps`, otherwise a step; truncated, at most `steps`.
fn edit_step(number: &str, steps: usize) -> Result<i64> {
    let v: f64 = number.parse().map_err(|_| {
        Error::invalid_argument("prompt", format!("the step `{number}`"), "a number")
    })?;
    let v = if number.contains('.') {
        v * steps as f64
    } else {
        v
    };
    if !v.is_finite() {
        return Err(Error::invalid_argument(
            "prompt",
            format!("the prompt-editing step `{number}`"),
            "a finite number (AUTOMATIC1111 fails on it too)",
        ));
    }
    Ok(if v >= steps as f64 {
        steps as i64
    } else {
        v.trunc() as i64
    })
}

/// Computes every edit's switching step (into `whens`, in visiting order) and collects the steps
/// at which the prompt changes.
fn collect_steps(
    nodes: &[Node<'_>],
    steps: usize,
    whens: &mut Vec<i64>,
    changes: &mut BTreeSet<usize>,
) -> Result<()> {
    for n in nodes {
        match n {
            Node::Text(_) => {}
            Node::Edit {
                before,
                after,
                number,
            } => {
                collect_steps(before, steps, whens, changes)?;
                collect_steps(after, steps, whens, changes)?;
                let when = edit_step(number, steps)?;
                if when >= 1 {
                    changes.insert(when as usize);
                }
                whens.push(when);
            }
            Node::Alternate(options) => {
                for o in options {
                    collect_steps(o, steps, whens, changes)?;
                }
                changes.extend(1..=steps);
            }
        }
    }
    Ok(())
}

/// Writes the prompt at `step` (`whens` consumed in [`collect_steps`]' order).
fn render(
    nodes: &[Node<'_>],
    step: usize,
    whens: &mut std::slice::Iter<'_, i64>,
    out: &mut String,
) {
    for n in nodes {
        match n {
            Node::Text(t) => out.push_str(t),
            Node::Edit { before, after, .. } => {
                // children were visited before the edit itself
                let mut b = String::new();
                render(before, step, whens, &mut b);
                let mut a = String::new();
                render(after, step, whens, &mut a);
                let when = whens.next().copied().unwrap_or(i64::MAX);
                out.push_str(if (step as i64) <= when { &b } else { &a });
            }
            Node::Alternate(options) => {
                let pick = (step.max(1) - 1) % options.len().max(1);
                for (k, o) in options.iter().enumerate() {
                    let mut s = String::new();
                    render(o, step, whens, &mut s);
                    if k == pick {
                        out.push_str(&s);
                    }
                }
            }
        }
    }
}

/// A1111's `get_learned_conditioning_prompt_schedules` for one prompt and `steps` sampling steps
/// (no hires pass): the distinct prompts over the run, each with the last step it applies to.
///
/// `[from:to:when]` is `from` up to and including step `when`, then `to`; `[to:when]` adds,
/// `[from::when]` removes; `when` with a `.` is a fraction of `steps` (`0.25`), otherwise a
/// step (`5`), truncated and capped at `steps`. `[a|b|c]` cycles through its options at every step.
/// Edits nest. A prompt the grammar rejects (a `|` outside an alternation, a trailing `\`) is
/// used as written for every step, as A1111 does.
///
/// Errors: `steps` 0, or an edit step that overflows (`[a:b:1e999]`; A1111 fails too).
///
/// ```
/// use sd_clip::prompt_syntax::prompt_schedule;
/// let s = prompt_schedule("a [b:c:3] d", 10).unwrap();
/// assert_eq!((s[0].end_at_step, s[0].prompt.as_str()), (3, "a b d"));
/// assert_eq!((s[1].end_at_step, s[1].prompt.as_str()), (10, "a c d"));
/// ```
pub fn prompt_schedule(prompt: &str, steps: usize) -> Result<Vec<ScheduledPrompt>> {
    if steps == 0 {
        return Err(Error::invalid_argument("steps", 0, "at least 1"));
    }
    let parser = ScheduleParser { s: prompt };
    let Some(nodes) = parser.start() else {
        return Ok(vec![ScheduledPrompt {
            end_at_step: steps,
            prompt: prompt.to_owned(),
        }]);
    };
    let mut whens = Vec::new();
    let mut changes = BTreeSet::from([steps]);
    collect_steps(&nodes, steps, &mut whens, &mut changes)?;
    Ok(changes
        .into_iter()
        .map(|step| {
            let mut text = String::new();
            render(&nodes, step, &mut whens.iter(), &mut text);
            ScheduledPrompt {
                end_at_step: step,
                prompt: text,
            }
        })
        .collect())
}

/// An extra-network tag `<kind:arg1:arg2...>` taken out of a prompt (`extra_networks.py`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraNetwork {
    /// `lora`, `lyco`, `hypernet`, ...
    pub kind: String,
    /// The `:`-separated arguments as written.
    pub args: Vec<String>,
}

/// A LoRA named in a prompt: `<lora:NAME>`, `<lora:NAME:W>`, `<lora:NAME:TE_W:UNET_W>`, or with
/// named `te=` / `unet=` arguments, as A1111's built-in Lora extension reads them.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraTag {
    /// The file name without extension (A1111 also accepts an alias).
    pub name: String,
    /// Multiplier for the text encoder(s) (default 1).
    pub te_weight: f64,
    /// Multiplier for the UNet (defaults to `te_weight`).
    pub unet_weight: f64,
}

impl ExtraNetwork {
    /// The LoRA this tag names (`lora`, or LyCORIS's `lyco` alias); `None` for other kinds.
    /// A weight that is not a number is an error.
    pub fn lora(&self) -> Option<Result<LoraTag>> {
        if self.kind != "lora" && self.kind != "lyco" {
            return None;
        }
        Some(self.read_lora())
    }

    fn read_lora(&self) -> Result<LoraTag> {
        let mut positional = Vec::new();
        let (mut te, mut unet) = (None, None);
        for a in &self.args {
            // Python's `item.split('=', 2)`: exactly one `=` makes a named argument
            match a.split('=').collect::<Vec<_>>()[..] {
                ["te", v] => te = Some(v),
                ["unet", v] => unet = Some(v),
                [_, _] => {}
                _ => positional.push(a.as_str()),
            }
        }
        let number = |s: &str| -> Result<f64> {
            s.trim().parse().map_err(|_| {
                Error::invalid_argument(
                    "lora weight",
                    format!("`{s}` in <{}:{}>", self.kind, self.args.join(":")),
                    "a number",
                )
            })
        };
        let name = positional
            .first()
            .map(|s| s.to_string())
            .unwrap_or_default();
        let mut te_weight = positional.get(1).map_or(Ok(1.0), |s| number(s))?;
        if let Some(v) = te {
            te_weight = number(v)?;
        }
        let mut unet_weight = positional.get(2).map_or(Ok(te_weight), |s| number(s))?;
        if let Some(v) = unet {
            unet_weight = number(v)?;
        }
        Ok(LoraTag {
            name,
            te_weight,
            unet_weight,
        })
    }
}

/// Takes every `<kind:args>` tag (A1111's `<(\w+):([^>]+)>`) out of `prompt`: the prompt without
/// them, and the tags in order.
///
/// ```
/// use sd_clip::prompt_syntax::extract_extra_networks;
/// let (p, tags) = extract_extra_networks("a cat <lora:pixel-art:0.7>, sharp");
/// assert_eq!(p, "a cat , sharp");
/// assert_eq!(tags[0].lora().unwrap().unwrap().te_weight, 0.7);
/// ```
pub fn extract_extra_networks(prompt: &str) -> (String, Vec<ExtraNetwork>) {
    let mut out = String::with_capacity(prompt.len());
    let mut tags = Vec::new();
    let mut rest = prompt;
    while let Some(lt) = rest.find('<') {
        let after = &rest[lt + 1..];
        let kind_len: usize = after
            .chars()
            .take_while(|c| py_word(*c))
            .map(char::len_utf8)
            .sum();
        let tag = (kind_len > 0 && after[kind_len..].starts_with(':'))
            .then(|| {
                let args = &after[kind_len + 1..];
                let gt = args.find('>')?;
                (gt > 0).then_some((&after[..kind_len], &args[..gt], kind_len + 1 + gt + 1))
            })
            .flatten();
        match tag {
            Some((kind, args, len)) => {
                out.push_str(&rest[..lt]);
                tags.push(ExtraNetwork {
                    kind: kind.to_owned(),
                    args: args.split(':').map(str::to_owned).collect(),
                });
                rest = &rest[lt + 1 + len..];
            }
            None => {
                out.push_str(&rest[..lt + 1]);
                rest = &rest[lt + 1..];
            }
        }
    }
    out.push_str(rest);
    (out, tags)
}

/// Refuses `AND` (A1111's `\bAND\b`, composable diffusion: one prediction per sub-prompt, summed
/// with weights), which sd-rs does not implement.
pub fn check_no_and(prompt: &str) -> Result<()> {
    let mut search = 0;
    while let Some(rel) = prompt[search..].find("AND") {
        let b = search + rel;
        let e = b + 3;
        let before_ok = prompt[..b].chars().next_back().is_none_or(|c| !py_word(c));
        let after_ok = prompt[e..].chars().next().is_none_or(|c| !py_word(c));
        if before_ok && after_ok {
            return Err(Error::unsupported(format!(
                "`AND` in the prompt {prompt:?}: AUTOMATIC1111's composable diffusion (one \
                 prediction per AND-separated sub-prompt) is not implemented in sd-rs; write \
                 `and`, or use --prompt-syntax plain"
            )));
        }
        search = b + 1;
    }
    Ok(())
}

/// A prompt read with A1111's syntax: its extra-network tags and its schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct A1111Prompt {
    /// The `<kind:args>` tags taken out of the text.
    pub extra_networks: Vec<ExtraNetwork>,
    /// The prompt for each range of steps (one entry without editing or alternation).
    pub schedule: Vec<ScheduledPrompt>,
}

impl A1111Prompt {
    /// Steps 1 to 3 of the module documentation: extra networks out, `AND` refused, schedule.
    pub fn parse(prompt: &str, steps: usize) -> Result<Self> {
        let (text, extra_networks) = extract_extra_networks(prompt);
        check_no_and(&text)?;
        let schedule = prompt_schedule(&text, steps)?;
        Ok(Self {
            extra_networks,
            schedule,
        })
    }

    /// The LoRA tags among [`A1111Prompt::extra_networks`].
    pub fn loras(&self) -> Result<Vec<LoraTag>> {
        self.extra_networks
            .iter()
            .filter_map(ExtraNetwork::lora)
            .collect()
    }

    /// The prompt when it does not change during sampling, else `None`.
    pub fn fixed(&self) -> Option<&str> {
        match &self.schedule[..] {
            [one] => Some(&one.prompt),
            _ => None,
        }
    }
}
