//! Chat templates rendered as transformers' `apply_chat_template` does: Jinja (here minijinja
//! with Python-compatible string/dict methods), `trim_blocks` and `lstrip_blocks` on, the
//! variables `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, and the helpers
//! templates call (`raise_exception`, `strftime_now`).

use minijinja::{Environment, Error, ErrorKind, Value};
use serde::{Deserialize, Serialize};

/// One chat message in OpenAI/HF shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Errors rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("the model has no chat template; pass a template or send a plain prompt")]
    Missing,
    #[error("chat template does not compile: {0:#}")]
    Syntax(Error),
    #[error("chat template failed: {0:#}")]
    Render(Error),
    #[error("chat template '{name}' is neither chatml, alpaca nor a readable file: {source}")]
    Unknown {
        name: String,
        source: std::io::Error,
    },
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

/// Instructions one render may run, and the deepest nesting (macros, includes, recursion).
const TEMPLATE_FUEL: u64 = 20_000_000;
const TEMPLATE_RECURSION: usize = 100;

impl ChatTemplate {
    /// Compiles `source`.
    ///
    /// # Errors
    /// [`TemplateError::Syntax`] with minijinja's location.
    pub fn new(
        source: &str,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        // Templates come inside downloaded model files: bound every render's work (minijinja
        // counts instructions as fuel) and its nesting. A long conversation with tools takes
        // well under a tenth of this.
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_recursion_limit(TEMPLATE_RECURSION);
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(TemplateError::Syntax)?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| -> String {
            strftime_now(&fmt)
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(TemplateError::Syntax)?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.unwrap_or_default().to_string(),
            eos_token: eos_token.unwrap_or_default().to_string(),
        })
    }

    /// Renders a conversation.
    ///
    /// # Errors
    /// [`TemplateError::Render`], including the template's own `raise_exception` messages.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        self.render_context(
            Value::from(minijinja::value::Serde(messages)),
            None,
            add_generation_prompt,
        )
    }

    /// Renders a conversation given as OpenAI/HF JSON messages (which may carry `tool_calls`,
    /// `tool` roles, content parts) with an optional list of tool schemas, as
    /// `apply_chat_template(messages, tools=…)` does.
    ///
    /// # Errors
    /// [`TemplateError::Render`], including the template's own `raise_exception` messages.
    pub fn render_json(
        &self,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        self.render_context(
            Value::from(minijinja::value::Serde(messages)),
            tools.map(|t| Value::from(minijinja::value::Serde(t))),
            add_generation_prompt,
        )
    }

    fn render_context(
        &self,
        messages: Value,
        tools: Option<Value>,
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(TemplateError::Render)?;
        tmpl.render(minijinja::context! {
            messages => messages,
            tools => tools,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(TemplateError::Render)
    }
}

/// Templates known by name, for models without one or to override a model's own.
///
/// - `chatml`: `<|im_start|>{role}\n{content}<|im_end|>\n` per message (Qwen, SmolLM, …);
/// - `alpaca`: `### Instruction:` / `### Response:` blocks, turns ended by the EOS token.
pub fn named_template(name: &str) -> Option<&'static str> {
    match name {
        "chatml" => Some(
            "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
        ),
        "alpaca" => Some(
            "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}",
        ),
        _ => None,
    }
}

/// The template source to use: `choice` (a name known to [`named_template`] or the path of a
/// Jinja file) over the model's own; `None` when neither exists.
///
/// # Errors
/// A `choice` that is neither a known name nor a readable file, naming it.
pub fn choose_template(
    choice: Option<&str>,
    model_own: Option<&str>,
) -> Result<Option<String>, TemplateError> {
    match choice {
        None => Ok(model_own.map(str::to_string)),
        Some(c) => match named_template(c) {
            Some(t) => Ok(Some(t.to_string())),
            None => std::fs::read_to_string(c)
                .map(Some)
                .map_err(|source| TemplateError::Unknown {
                    name: c.into(),
                    source,
                }),
        },
    }
}

/// The few `strftime` codes chat templates use (Llama 3's date line), in UTC.
fn strftime_now(fmt: &str) -> String {
    let (y, m, d, ..) = crate::clock::utc_now();
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    fmt.replace("%Y", &y.to_string())
        .replace("%m", &format!("{m:02}"))
        .replace("%d", &format!("{d:02}"))
        .replace("%B", MONTHS[(m - 1) as usize])
        .replace("%b", &MONTHS[(m - 1) as usize][..3])
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn a_template_from_a_file_is_bounded_and_reads_no_files_or_environment() {
        let hi = [Message::new("user", "hi")];
        let render = |src: &str| {
            let t = std::time::Instant::now();
            let out = ChatTemplate::new(src, None, None).and_then(|c| c.render(&hi, true));
            (out, t.elapsed())
        };
        // 10^5 × 10^5 iterations would run for hours: fuel stops it.
        let (out, took) = render(
            "{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}",
        );
        let e = out.expect_err("out of fuel").to_string();
        assert!(e.contains("fuel"), "{e}");
        assert!(took.as_secs() < 10, "{took:?}");
        let (out, _) = render("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}");
        assert!(out.is_err(), "unbounded recursion rendered");
        for src in [
            "{% include '/etc/passwd' %}",
            "{% import '/etc/hosts' as h %}",
            "{{ env }}{{ environ }}{{ os }}",
        ] {
            let (out, _) = render(src);
            if let Ok(text) = out {
                assert!(text.trim().is_empty(), "{src} rendered {text:?}");
            }
        }
    }

    #[test]
    fn chatml_renders() {
        let t = ChatTemplate::new(CHATML, None, None).unwrap();
        let out = t.render(&[Message::new("user", "hi")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_surfaces_the_message() {
        let t =
            ChatTemplate::new("{{ raise_exception('roles must alternate') }}", None, None).unwrap();
        let e = t.render(&[], false).unwrap_err().to_string();
        assert!(e.contains("roles must alternate"), "{e}");
    }

    #[test]
    fn python_string_methods_work() {
        let t =
            ChatTemplate::new("{{ messages[0]['content'].strip().upper() }}", None, None).unwrap();
        assert_eq!(
            t.render(&[Message::new("user", "  ok ")], false).unwrap(),
            "OK"
        );
    }
}
