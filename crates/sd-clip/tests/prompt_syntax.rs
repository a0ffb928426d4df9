//! A1111 prompt syntax: the documented examples of `modules/prompt_parser.py`, references computed
//! by A1111's own parser (`tools/fixtures/a1111_prompt_refs.py`), and a no-panic property.

use proptest::prelude::*;
use sd_clip::prompt_syntax::{
    check_no_and, extract_extra_networks, parse_prompt_attention, prompt_schedule, split_break,
    A1111Prompt, LoraTag,
};
use sd_core::testing::fixtures_dir;

fn attention(p: &str) -> Vec<(String, f64)> {
    parse_prompt_attention(p)
        .expect("parses")
        .into_iter()
        .map(|f| (f.text, f.weight))
        .collect()
}

fn schedule(p: &str, steps: usize) -> Vec<(usize, String)> {
    prompt_schedule(p, steps)
        .expect("schedules")
        .into_iter()
        .map(|s| (s.end_at_step, s.prompt))
        .collect()
}

fn owned(v: &[(&str, f64)]) -> Vec<(String, f64)> {
    v.iter().map(|(t, w)| (t.to_string(), *w)).collect()
}

#[test]
fn attention_docstring_examples() {
    assert_eq!(attention("normal text"), owned(&[("normal text", 1.0)]));
    assert_eq!(
        attention("an (important) word"),
        owned(&[("an ", 1.0), ("important", 1.1), (" word", 1.0)])
    );
    assert_eq!(attention("(unbalanced"), owned(&[("unbalanced", 1.1)]));
    assert_eq!(attention(r"\(literal\]"), owned(&[("(literal]", 1.0)]));
    assert_eq!(
        attention("(unnecessary)(parens)"),
        owned(&[("unnecessaryparens", 1.1)])
    );
    // Python prints 1.5730000000000004 and 1.4641000000000006: the same doubles
    assert_eq!(
        attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."),
        owned(&[
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ])
    );
}

#[test]
fn attention_break_and_edge_cases() {
    assert_eq!(
        attention("a BREAK b"),
        owned(&[("a", 1.0), ("BREAK", -1.0), ("b", 1.0)])
    );
    let f = parse_prompt_attention("a BREAK b").expect("parses");
    assert!(f[1].is_break());
    // inside brackets A1111 multiplies the marker too: it is then the word BREAK, weight -1.1
    let f = parse_prompt_attention("(a BREAK b)").expect("parses");
    assert_eq!(f[1].text, "BREAK");
    assert_eq!(f[1].weight, -1.1);
    assert!(!f[1].is_break());
    assert_eq!(attention(""), owned(&[("", 1.0)]));
    assert_eq!(attention("(a: 2 )"), owned(&[("a", 2.0)]));
    assert_eq!(attention("x:1.5) y"), owned(&[("x:1.5) y", 1.0)]));
    assert_eq!(
        split_break("aBREAK BREAK_ x BREAK"),
        vec!["aBREAK BREAK_ x", ""]
    );
    let err = parse_prompt_attention("(a:1.2.3)").expect_err("not a number");
    assert!(err.to_string().contains("1.2.3"), "{err}");
}

#[test]
fn schedule_docstring_examples() {
    let s = |v: &[(usize, &str)]| -> Vec<(usize, String)> {
        v.iter().map(|(n, t)| (*n, t.to_string())).collect()
    };
    assert_eq!(schedule("test", 10), s(&[(10, "test")]));
    assert_eq!(schedule("a [b:3]", 10), s(&[(3, "a "), (10, "a b")]));
    assert_eq!(schedule("a [b: 3]", 10), s(&[(3, "a "), (10, "a b")]));
    assert_eq!(
        schedule("a [[[b]]:2]", 10),
        s(&[(2, "a "), (10, "a [[b]]")])
    );
    assert_eq!(schedule("[(a:2):3]", 10), s(&[(3, ""), (10, "(a:2)")]));
    assert_eq!(
        schedule("a [b : c : 1] d", 10),
        s(&[(1, "a b  d"), (10, "a  c  d")])
    );
    assert_eq!(
        schedule("a[b:[c:d:2]:1]e", 10),
        s(&[(1, "abe"), (2, "ace"), (10, "ade")])
    );
    assert_eq!(schedule("a [unbalanced", 10), s(&[(10, "a [unbalanced")]));
    assert_eq!(schedule("a [b:.5] c", 10), s(&[(5, "a  c"), (10, "a b c")]));
    assert_eq!(
        schedule("((a][:b:c [d:3]", 10),
        s(&[(3, "((a][:b:c "), (10, "((a][:b:c d")])
    );
    let alt: Vec<(usize, String)> = (1..=10)
        .map(|i| (i, if i % 2 == 1 { "a" } else { "(b:1.1)" }.to_string()))
        .collect();
    assert_eq!(schedule("[a|(b:1.1)]", 10), alt);
    let fe: Vec<(usize, String)> = (1..=10)
        .map(|i| (i, if i % 4 == 1 { "female" } else { "male" }.to_string()))
        .collect();
    assert_eq!(schedule("[fe|||]male", 10), fe);
    // the comment at the top of prompt_parser.py, 100 steps
    let p = "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]\
             [ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]";
    assert_eq!(
        schedule(p, 100),
        s(&[
            (
                25,
                "fantasy landscape with a mountain and an oak in foreground shoddy"
            ),
            (
                50,
                "fantasy landscape with a lake and an oak in foreground in background shoddy"
            ),
            (
                60,
                "fantasy landscape with a lake and an oak in foreground in background masterful"
            ),
            (
                75,
                "fantasy landscape with a lake and an oak in background masterful"
            ),
            (
                100,
                "fantasy landscape with a lake and a christmas tree in background masterful"
            ),
        ])
    );
    // a `|` outside an alternation: the grammar rejects the prompt, used as written
    assert_eq!(schedule("a | b", 10), s(&[(10, "a | b")]));
    assert!(prompt_schedule("[a:b:1e999]", 10).is_err());
    assert!(prompt_schedule("a", 0).is_err());
}

#[derive(serde::Deserialize)]
struct RefFile {
    cases: Vec<RefCase>,
}

#[derive(serde::Deserialize)]
struct RefCase {
    prompt: String,
    attention: serde_json::Value,
    schedules: std::collections::BTreeMap<String, Vec<serde_json::Value>>,
}

/// Every prompt of `refs/a1111_prompts.json` (44 fixed; 1,200 random: a third over an alphabet of
/// brackets, colons, bars, backslashes, numbers, BREAK, AND, newlines and accents, the rest from a
/// random grammar of nested weights, edits and alternations, some with one character replaced),
/// at 1, 4 and 10 steps: the same fragments with bit-identical weights, and one of the schedules
/// A1111 gives under 6 hash seeds (its lark parser resolves some ambiguities differently per
/// process: 71 prompts of the file get several readings), except the 4 [`AMBIGUOUS`] ones.
#[test]
fn matches_a1111_parser_references() {
    let path = fixtures_dir().join("refs").join("a1111_prompts.json");
    let text = std::fs::read_to_string(&path).expect("reference file");
    let refs: RefFile = serde_json::from_str(&text).expect("reference json");
    let mut checked = 0;
    let mut differing = std::collections::BTreeSet::new();
    for c in &refs.cases {
        match (&c.attention, parse_prompt_attention(&c.prompt)) {
            (serde_json::Value::String(e), got) => {
                assert!(got.is_err(), "{:?}: A1111 {e}, we {got:?}", c.prompt)
            }
            (serde_json::Value::Array(want), Ok(got)) => {
                let want: Vec<(String, f64)> = want
                    .iter()
                    .map(|f| {
                        let t = f[0].as_str().expect("text").to_owned();
                        let w: f64 = f[1].as_str().expect("repr").parse().expect("float");
                        (t, w)
                    })
                    .collect();
                let got: Vec<(String, f64)> = got.into_iter().map(|f| (f.text, f.weight)).collect();
                assert_eq!(got, want, "attention of {:?}", c.prompt);
            }
            (want, got) => panic!("{:?}: A1111 {want}, we {got:?}", c.prompt),
        }
        for (steps, options) in &c.schedules {
            let steps: usize = steps.parse().expect("steps");
            let got = prompt_schedule(&c.prompt, steps);
            let ok = options.iter().any(|o| match (o, &got) {
                (serde_json::Value::String(_), Err(_)) => true,
                (serde_json::Value::Array(want), Ok(got)) => {
                    want.len() == got.len()
                        && want.iter().zip(got).all(|(w, g)| {
                            w[0].as_u64() == Some(g.end_at_step as u64)
                                && w[1].as_str() == Some(g.prompt.as_str())
                        })
                }
                _ => false,
            });
            if !ok {
                assert!(
                    AMBIGUOUS.iter().any(|a| c.prompt.starts_with(a)),
                    "schedule of {:?} at {steps} steps: A1111 {options:?}, we {got:?}",
                    c.prompt
                );
                differing.insert(c.prompt.as_str());
            }
            checked += 1;
        }
    }
    assert_eq!(checked, refs.cases.len() * 3);
    assert_eq!(differing.len(), AMBIGUOUS.len(), "{differing:?}");
}

/// The random prompts of the reference file whose schedule is none of the readings A1111 gave
/// under 6 hash seeds. Each holds edits or alternations directly followed by a bracket character
/// (`...: 3 ]: 3 ]`, `...:-1]([`, `...:.3]:)`), where lark's grammar is ambiguous and the webui's
/// choice varies with the process (3 of the 4 get several readings from A1111 itself); we read
/// every such group as the edit/alternation.
const AMBIGUOUS: [&str; 4] = [
    "[a[[dogb c:0.75]]\\(:[(ab c)|b cdog",
    "[x,b ca:[[x,:x,b c :1e0]a(dogdogdog)]",
    "([ (x,:3][[b c:1e0] dog:1e0][é[x,:9]",
    "[[[x,:b c:1]:( a:3):0.5][[ b c](a  )",
];

#[test]
fn extra_networks_are_taken_out() {
    let (p, tags) = extract_extra_networks(
        "<lora:add_detail:0.6> portrait, <lora:style:0.8:0.4> <hypernet:x:1><lora:te:unet=0.3:te=0.2>",
    );
    assert_eq!(p, " portrait,  ");
    let loras: Vec<LoraTag> = tags
        .iter()
        .filter_map(|t| t.lora())
        .collect::<sd_core::Result<_>>()
        .expect("weights parse");
    let l = |n: &str, te: f64, unet: f64| LoraTag {
        name: n.into(),
        te_weight: te,
        unet_weight: unet,
    };
    assert_eq!(
        loras,
        vec![
            l("add_detail", 0.6, 0.6),
            l("style", 0.8, 0.4),
            l("te", 0.2, 0.3)
        ]
    );
    assert_eq!(tags[2].kind, "hypernet");
    // not tags: no name, no arguments, no closing >
    let (p, tags) = extract_extra_networks("a <b> <:x> <lora:> <lora:x");
    assert_eq!(p, "a <b> <:x> <lora:> <lora:x");
    assert!(tags.is_empty());
    let (_, tags) = extract_extra_networks("<lora:x:heavy>");
    assert!(tags[0].lora().expect("a lora").is_err());
}

#[test]
fn and_is_refused() {
    let err = check_no_and("a cat AND a dog").expect_err("composable diffusion");
    assert!(err.to_string().contains("AND"), "{err}");
    assert!(A1111Prompt::parse("a cat AND a dog:0.5", 20).is_err());
    check_no_and("SANDY ANDES, cat and dog, AND_x").expect("no standalone AND");
    let p = A1111Prompt::parse("<lora:a:0.5>a [cat:dog:0.5]", 20).expect("parses");
    assert_eq!(p.schedule.len(), 2);
    assert_eq!(p.fixed(), None);
    assert_eq!(p.loras().expect("loras")[0].name, "a");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// Any string: no panic; the schedule always ends at `steps` and is increasing.
    #[test]
    fn never_panics(s in "\\PC{0,60}", t in "[\\[\\]():|\\\\ aB,.0-9<>A-Z]{0,60}", steps in 1usize..40) {
        for p in [&s, &t] {
            let _ = parse_prompt_attention(p);
            let _ = extract_extra_networks(p);
            let _ = check_no_and(p);
            if let Ok(sched) = prompt_schedule(p, steps) {
                prop_assert_eq!(sched.last().map(|e| e.end_at_step), Some(steps));
                prop_assert!(sched.windows(2).all(|w| w[0].end_at_step < w[1].end_at_step));
            }
        }
    }
}

#[test]
fn deep_nesting_does_not_overflow_the_stack() {
    let deep = format!("{}a{}", "[".repeat(50_000), "]".repeat(50_000));
    let s = prompt_schedule(&deep, 10).expect("schedules");
    assert_eq!(s.len(), 1);
    let f = parse_prompt_attention(&deep).expect("parses");
    assert_eq!(f.len(), 1);
}
