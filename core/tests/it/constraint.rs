//! Constrained decoding on real vocabularies (SmolLM2's byte-level BPE, Gemma 3's
//! SentencePiece): whatever the logits say, the masked output matches the grammar. Logits
//! here are seeded noise, the worst case for a constraint: only the mask keeps the output
//! valid.

use graft_core::generation::constraint::{ConstraintError, Grammar, GrammarCompiler};
use graft_core::load::LoadedModel;
use graft_core::text::tool_calls::{ToolFormat, ToolSpec};
use serde_json::{json, Value};

use crate::B;

/// Greedy decoding over seeded random logits under `grammar`; the decoded output.
fn drive(
    model: &LoadedModel<B>,
    compiler: &GrammarCompiler,
    grammar: &Grammar,
    seed: u64,
) -> String {
    let tok = model.tokenizer.as_ref().expect("tokenizer");
    let vocab = model.model.config.vocab_size;
    let mut c = compiler.compile(grammar).expect("valid grammar");
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut out = Vec::new();
    for _ in 0..400 {
        if c.is_finished() {
            break;
        }
        let mut row: Vec<f32> = (0..vocab)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 40) as f32 / (1u64 << 24) as f32
            })
            .collect();
        c.mask(&mut row).expect("mask");
        let best = (0..vocab)
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .expect("vocab");
        assert!(row[best].is_finite(), "the mask allows no token at all");
        if tok.eos_ids.contains(&(best as u32)) {
            assert!(
                c.is_accepting(),
                "end of sequence allowed before the output is complete"
            );
            break;
        }
        c.advance(best as u32).expect("a token the mask allowed");
        out.push(best as u32);
    }
    assert!(
        c.is_finished() || c.is_accepting(),
        "no complete output in 400 tokens: {:?}",
        tok.decode(&out, false)
    );
    tok.decode(&out, false).expect("decode")
}

fn schema() -> Value {
    json!({"type": "object",
           "properties": {"name": {"type": "string", "maxLength": 12},
                          "ok": {"type": "boolean"},
                          "n": {"type": "integer", "minimum": 0, "maximum": 99}},
           "required": ["name", "ok", "n"], "additionalProperties": false})
}

fn check_all(model: &LoadedModel<B>) {
    let tok = model.tokenizer.as_ref().expect("tokenizer");
    let compiler = GrammarCompiler::new(tok, model.model.config.vocab_size).expect("vocabulary");
    for seed in 0..4 {
        let text = drive(model, &compiler, &Grammar::JsonSchema(schema()), seed);
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert!(
            v["name"].as_str().is_some_and(|s| s.chars().count() <= 12),
            "{text}"
        );
        assert!(v["ok"].is_boolean(), "{text}");
        assert!(v["n"].as_u64().is_some_and(|n| n <= 99), "{text}");
        assert_eq!(v.as_object().expect("object").len(), 3, "{text}");

        let text = drive(
            model,
            &compiler,
            &Grammar::Regex("[0-9]{3}-[a-z]{2}".into()),
            seed,
        );
        let b = text.as_bytes();
        assert!(
            b.len() == 6
                && b[..3].iter().all(u8::is_ascii_digit)
                && b[3] == b'-'
                && b[4..].iter().all(u8::is_ascii_lowercase),
            "{text:?}"
        );
        let options = vec!["yes".to_string(), "no".into(), "maybe later".into()];
        let text = drive(model, &compiler, &Grammar::Choice(options.clone()), seed);
        assert!(options.contains(&text), "{text:?}");
    }
    let text = drive(
        model,
        &compiler,
        &Grammar::Lark("start: \"x\" \"y\"*\n".into()),
        9,
    );
    assert!(
        text.starts_with('x') && text[1..].chars().all(|c| c == 'y'),
        "{text:?}"
    );
    // A forced tool call in either format parses back into a call of a listed tool.
    let tools = vec![
        ToolSpec {
            name: "get_weather".into(),
            parameters: json!({"type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}}, "required": ["city"],
            "additionalProperties": false}),
        },
        ToolSpec {
            name: "noop".into(),
            parameters: json!({"type": "object", "properties": {},
            "additionalProperties": false}),
        },
    ];
    for format in [ToolFormat::Hermes, ToolFormat::Llama3Json] {
        for (seed, name) in [(1, None), (2, Some("noop"))] {
            let text = drive(model, &compiler, &format.grammar(&tools, name), seed);
            let names: Vec<String> = tools.iter().map(|t| t.name.clone()).collect();
            let (_, calls) = format.parse(&text, &names);
            assert_eq!(calls.len(), 1, "{format:?}: {text:?}");
            assert!(tools.iter().any(|t| t.name == calls[0].name), "{text:?}");
            if let Some(n) = name {
                assert_eq!(calls[0].name, n);
            }
        }
    }
    // Any object: noise never ends one, so only check that it starts as one.
    let mut c = compiler.compile(&Grammar::JsonObject).expect("valid");
    let mut row = vec![0.0f32; model.model.config.vocab_size];
    c.mask(&mut row).expect("mask");
    let allowed: Vec<u32> = (0..row.len() as u32)
        .filter(|&t| row[t as usize].is_finite())
        .collect();
    assert!(!allowed.is_empty());
    for t in allowed {
        let text = tok.decode(&[t], false).expect("decode");
        assert!(
            text.trim_start().is_empty() || text.trim_start().starts_with('{'),
            "{text:?}"
        );
    }
    for bad in [
        Grammar::Regex("(".into()),
        Grammar::Lark("start: (".into()),
        Grammar::Choice(Vec::new()),
        Grammar::JsonSchema(json!({"type": "no-such-type"})),
    ] {
        match compiler.compile(&bad) {
            Err(ConstraintError::Invalid { message, .. }) => assert!(!message.is_empty()),
            other => panic!("{bad:?} was not refused: {other:?}"),
        }
    }
}

#[test]
fn masked_outputs_match_the_grammar_on_smollm2s_vocabulary() {
    check_all(crate::smollm2::gguf_model());
}

#[test]
fn masked_outputs_match_the_grammar_on_gemma3s_sentencepiece_vocabulary() {
    check_all(crate::real_models::gemma3());
}
