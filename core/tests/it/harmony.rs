//! GPT-OSS's harmony chat template (`scripts/reference/moe.py` puts the one TRL ships as
//! GPT-OSS's own into the tiny model's `tokenizer_config.json`, and llama.cpp's converter into
//! its GGUF): graft renders each conversation — system and developer messages, reasoning in
//! `thinking`, tool schemas, tool calls and results — as transformers does.

use graft_core::text::chat::ChatTemplate;
use serde::Deserialize;

use crate::families::load_family;
use crate::reference::fixture;
use crate::smollm2::ChatCase;

#[derive(Deserialize)]
struct Rendered {
    /// The day transformers rendered on (the template prints the current date).
    date: String,
    cases: Vec<ChatCase>,
}

/// `text` with the date after `Current date: ` replaced by `date`.
fn dated(text: &str, date: &str) -> String {
    const LINE: &str = "Current date: ";
    match text.find(LINE) {
        Some(at) => {
            let from = at + LINE.len();
            format!("{}{date}{}", &text[..from], &text[from + date.len()..])
        }
        None => text.to_string(),
    }
}

#[test]
fn harmony_conversations_render_as_transformers_renders_them() {
    let fx: Rendered = serde_json::from_str(
        &std::fs::read_to_string(fixture("families/gpt_oss/chat_template.json")).expect("fixture"),
    )
    .expect("json");
    assert!(
        fx.cases.iter().any(|c| c.tools.is_some()),
        "a case with tools"
    );
    for gguf in [false, true] {
        let loaded = load_family("gpt_oss", gguf);
        let tok = loaded.tokenizer.as_ref().expect("a tokenizer");
        let source = tok.chat_template.as_deref().expect("the harmony template");
        assert!(source.contains("<|channel|>"), "gguf {gguf}: not harmony");
        let tmpl = ChatTemplate::new(source, tok.bos_token.as_deref(), tok.eos_token.as_deref())
            .expect("compiles");
        for (i, c) in fx.cases.iter().enumerate() {
            let got = tmpl
                .render_json(&c.messages, c.tools.as_ref(), c.add_generation_prompt)
                .unwrap_or_else(|e| panic!("case {i}: {e}"));
            assert_eq!(dated(&got, &fx.date), c.rendered, "gguf {gguf} case {i}");
        }
    }
}
