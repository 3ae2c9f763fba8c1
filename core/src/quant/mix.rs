//! Which GGML type each tensor of a GGUF model gets for a llama.cpp file type (`--quant
//! q4_k_m` …): `llama-quant.cpp`'s rules for the file types graft writes, so that a merged model
//! has the tensor mix `llama-quantize` would give it. Q4_K_M is Q4_K with Q6_K for the output
//! (or the tied embeddings), for `attn_v`/`attn_qkv` and `ffn_down` in the first and last
//! eighth of the layers and every third layer between; a tensor whose rows are not whole
//! 256-blocks falls back to Q5_0 (for Q4_K) or Q8_0 (for Q6_K).

use std::fmt;
use std::str::FromStr;

use super::GgmlType;

/// A llama.cpp file type (`LLAMA_FTYPE_*`) graft can write.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q6_K,
    Q5_1,
    Q5_0,
    Q4_1,
    Q4_0,
    Q4_K_M,
}

impl FileType {
    pub const ALL: [FileType; 10] = [
        FileType::F32,
        FileType::F16,
        FileType::BF16,
        FileType::Q8_0,
        FileType::Q6_K,
        FileType::Q5_1,
        FileType::Q5_0,
        FileType::Q4_1,
        FileType::Q4_0,
        FileType::Q4_K_M,
    ];

    /// The name on the command line (`q4_k_m`).
    pub fn name(self) -> &'static str {
        match self {
            FileType::F32 => "f32",
            FileType::F16 => "f16",
            FileType::BF16 => "bf16",
            FileType::Q8_0 => "q8_0",
            FileType::Q6_K => "q6_k",
            FileType::Q5_1 => "q5_1",
            FileType::Q5_0 => "q5_0",
            FileType::Q4_1 => "q4_1",
            FileType::Q4_0 => "q4_0",
            FileType::Q4_K_M => "q4_k_m",
        }
    }

    /// `general.file_type`: llama.cpp's `llama_ftype` id.
    pub fn id(self) -> u32 {
        match self {
            FileType::F32 => 0,
            FileType::F16 => 1,
            FileType::Q4_0 => 2,
            FileType::Q4_1 => 3,
            FileType::Q8_0 => 7,
            FileType::Q5_0 => 8,
            FileType::Q5_1 => 9,
            FileType::Q4_K_M => 15,
            FileType::Q6_K => 18,
            FileType::BF16 => 32,
        }
    }

    /// The type of a tensor no rule singles out.
    pub fn default_type(self) -> GgmlType {
        match self {
            FileType::F32 => GgmlType::F32,
            FileType::F16 => GgmlType::F16,
            FileType::BF16 => GgmlType::BF16,
            FileType::Q8_0 => GgmlType::Q8_0,
            FileType::Q6_K => GgmlType::Q6_K,
            FileType::Q5_1 => GgmlType::Q5_1,
            FileType::Q5_0 => GgmlType::Q5_0,
            FileType::Q4_1 => GgmlType::Q4_1,
            FileType::Q4_0 => GgmlType::Q4_0,
            FileType::Q4_K_M => GgmlType::Q4_K,
        }
    }
}

impl fmt::Display for FileType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FileType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        FileType::ALL
            .into_iter()
            .find(|t| t.name() == s.to_ascii_lowercase())
            .ok_or_else(|| {
                format!(
                    "unknown GGUF quantization '{s}' (graft writes {})",
                    FileType::ALL.map(FileType::name).join(", ")
                )
            })
    }
}

/// A tensor as the rules see it: its name and shape (torch order) and its type in the source.
#[derive(Debug, Clone, Copy)]
pub struct TensorRef<'a> {
    pub name: &'a str,
    pub shape: &'a [usize],
    pub ty: GgmlType,
}

/// The order in which `llama-quantize` visits (and writes) a model's tensors: by layer number
/// (`blk.N.`; tensors outside the layers first), then by name. Its rules count `attn_v` and
/// `ffn_down` tensors in this order, so a file whose tensors are sorted by name alone
/// (`blk.0`, `blk.1`, `blk.10`, …) must be visited in this order to get llama.cpp's mix.
pub fn quantize_order(names: &[&str]) -> Vec<usize> {
    let layer = |n: &str| -> i64 {
        n.strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|l| l.parse().ok())
            .unwrap_or(-1)
    };
    let mut order: Vec<usize> = (0..names.len()).collect();
    order.sort_by(|&a, &b| (layer(names[a]), names[a]).cmp(&(layer(names[b]), names[b])));
    order
}

/// The types of a whole model's tensors for one file type. Ask for every tensor once, in
/// [`quantize_order`].
#[derive(Debug)]
pub struct Mix {
    ftype: FileType,
    tied_embeddings: bool,
    n_attention_v: usize,
    i_attention_v: usize,
    n_ffn_down: usize,
    i_ffn_down: usize,
}

fn is_attn_v(name: &str) -> bool {
    name.contains("attn_v.weight") || name.contains("attn_qkv.weight")
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third one
/// between.
fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i as i64 - (n / 8) as i64).rem_euclid(3) == 2
}

impl Mix {
    /// Plans `ftype` for a model of `n_layers` layers whose tensors are `names`.
    pub fn new<'a>(ftype: FileType, n_layers: usize, names: impl Iterator<Item = &'a str>) -> Self {
        let (mut n_attention_v, mut tied_embeddings) = (0, true);
        for name in names {
            if is_attn_v(name) {
                n_attention_v += 1;
            }
            if name == "output.weight" {
                tied_embeddings = false;
            }
        }
        Mix {
            ftype,
            tied_embeddings,
            n_attention_v,
            i_attention_v: 0,
            n_ffn_down: n_layers,
            i_ffn_down: 0,
        }
    }

    /// Whether llama.cpp quantizes this tensor at all: 2-D or more, a `weight`, not a norm.
    fn quantizable(t: &TensorRef<'_>) -> bool {
        t.shape.len() >= 2
            && t.name.ends_with("weight")
            && !t.name.contains("_norm.weight")
            && !t.name.contains("ffn_gate_inp.weight")
    }

    /// The type of the next tensor (call once per tensor, in [`quantize_order`]).
    pub fn tensor_type(&mut self, t: TensorRef<'_>) -> GgmlType {
        if !Self::quantizable(&t) {
            return t.ty;
        }
        let mut ty = self.ftype.default_type();
        if matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
            return ty;
        }
        let cols = *t.shape.last().unwrap_or(&0);
        let k_m = self.ftype == FileType::Q4_K_M;
        if t.name == "output.weight" || (self.tied_embeddings && t.name == "token_embd.weight") {
            if cols % ty.block_size() != 0 {
                ty = GgmlType::Q8_0;
            } else if ty != GgmlType::Q8_0 {
                ty = GgmlType::Q6_K;
            }
        } else if t.name == "token_embd.weight" {
            // untied embeddings keep the default type
        } else if is_attn_v(t.name) {
            // attn_qkv shares attn_v's rule: llama-quant.cpp tests `category_is_attn_v` (which
            // includes ATTENTION_QKV) before its own ATTENTION_QKV branch
            if k_m && use_more_bits(self.i_attention_v, self.n_attention_v) {
                ty = GgmlType::Q6_K;
            }
            self.i_attention_v += 1;
        } else if t.name.contains("ffn_down") {
            if k_m && use_more_bits(self.i_ffn_down, self.n_ffn_down) {
                ty = GgmlType::Q6_K;
            }
            self.i_ffn_down += 1;
        }
        fallback(ty, cols)
    }
}

/// A type for rows of `cols` values: the next smaller-block type when `cols` is not whole
/// blocks of `ty`, F16 when that does not fit either (`tensor_type_fallback`).
pub(crate) fn fallback(ty: GgmlType, cols: usize) -> GgmlType {
    if cols % ty.block_size() == 0 {
        return ty;
    }
    let smaller = match ty {
        GgmlType::Q4_K => GgmlType::Q5_0,
        GgmlType::Q5_K => GgmlType::Q5_1,
        GgmlType::Q6_K => GgmlType::Q8_0,
        GgmlType::Q2_K | GgmlType::Q3_K => GgmlType::Q4_0,
        GgmlType::IQ4_XS => GgmlType::IQ4_NL,
        other => other,
    };
    if cols % smaller.block_size() == 0 {
        smaller
    } else {
        GgmlType::F16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn use_more_bits_matches_llama_cpp_for_24_layers() {
        let picked: Vec<usize> = (0..24).filter(|&i| use_more_bits(i, 24)).collect();
        // n/8 = 3: layers 0-2, 21-23, and (i - 3) % 3 == 2 → 5, 8, …, 20
        assert_eq!(picked, [0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23]);
    }

    #[test]
    fn tensors_are_visited_by_layer_number_then_name() {
        let names = [
            "blk.10.attn_v.weight",
            "blk.2.attn_v.weight",
            "output.weight",
            "blk.2.attn_k.weight",
        ];
        assert_eq!(quantize_order(&names), [2, 3, 1, 0]);
    }

    #[test]
    fn layers_stored_in_name_order_get_the_mix_of_their_layer_number() {
        // SmolLM2's GGUF stores blk.0, blk.1, blk.10, … : the rules must follow layer numbers.
        let mut names: Vec<String> = (0..30)
            .map(|i| format!("blk.{i}.ffn_down.weight"))
            .collect();
        names.sort();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut mix = Mix::new(FileType::Q4_K_M, 30, refs.iter().copied());
        let mut q6: Vec<usize> = vec![];
        for i in quantize_order(&refs) {
            let ty = mix.tensor_type(TensorRef {
                name: refs[i],
                shape: &[576, 1536],
                ty: GgmlType::F32,
            });
            if ty == GgmlType::Q6_K {
                q6.push(refs[i][4..].split('.').next().unwrap().parse().unwrap());
            }
        }
        q6.sort();
        assert_eq!(q6, [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]);
    }

    #[test]
    fn names_parse_and_unknown_ones_are_listed() {
        assert_eq!("Q4_K_M".parse::<FileType>(), Ok(FileType::Q4_K_M));
        let err = "q3_k_s".parse::<FileType>().expect_err("not written");
        assert!(err.contains("q3_k_s") && err.contains("q4_k_m"), "{err}");
    }

    #[test]
    fn small_rows_fall_back_to_32_blocks_then_f16() {
        assert_eq!(fallback(GgmlType::Q4_K, 896), GgmlType::Q5_0);
        assert_eq!(fallback(GgmlType::Q6_K, 896), GgmlType::Q8_0);
        assert_eq!(fallback(GgmlType::Q4_K, 40), GgmlType::F16);
        assert_eq!(fallback(GgmlType::Q4_K, 512), GgmlType::Q4_K);
    }
}
