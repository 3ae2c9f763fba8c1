//! Prompts decoded together (`generation::batch`) give what each gives alone.

use graft_core::adapters::peft;
use graft_core::generation::batch::generate_batch;
use graft_core::generation::generate::{generate, GenerateError};
use graft_core::generation::sampling::SamplingParams;

use crate::families::load_family;
use crate::reference::fixture;

#[test]
fn a_ragged_batch_decodes_as_each_prompt_alone() {
    let loaded = load_family("qwen2", true);
    let tok = loaded.tokenizer.as_ref().expect("the GGUF has a tokenizer");
    let (adapter, _) =
        peft::load(&fixture("families/qwen2/peft_adapter"), &loaded.model).expect("adapter");
    let params = SamplingParams {
        temperature: 0.0,
        max_new_tokens: 12,
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let prompts: Vec<Vec<u32>> = vec![
        (1..20).collect(),
        vec![7, 8],
        (30..33).collect(),
        vec![],
        (100..140).collect(),
    ];
    for adapter in [None, Some(&adapter)] {
        let together = generate_batch(&loaded.model, tok, adapter, &prompts, &params);
        assert_eq!(together.len(), prompts.len());
        for (p, got) in prompts.iter().zip(together) {
            if p.is_empty() {
                assert!(matches!(got, Err(GenerateError::EmptyPrompt)));
                continue;
            }
            let got = got.expect("generates");
            let alone = generate(&loaded.model, tok, adapter, p, &params, |_| {}).expect("alone");
            assert_eq!(got.tokens, alone.tokens, "prompt {p:?}");
            assert_eq!(got.text, alone.text);
            assert_eq!(got.tokens.len(), 12);
            assert_eq!(got.prompt_tokens, p.len());
        }
    }
}
