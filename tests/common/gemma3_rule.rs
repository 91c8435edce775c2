//! The Gemma 3 golden tests' rule, shared by the CPU test (`tests/gemma3_golden.rs`) and the
//! GPU one (`actors/tests/gpu_gemma3.rs`): how many of llama.cpp's greedy ids a run must follow.

/// Margin below which the reference's top-2 is a near-tie that rounding may flip.
pub const TIE_MARGIN: f32 = 0.25;

/// How a run's greedy ids compare with llama.cpp's.
pub struct Agreement {
    /// Length of the common prefix.
    pub agree: usize,
    /// The prefix required: up to the first step that llama.cpp's margins or the float32
    /// evaluation's call a near-tie.
    pub required: usize,
    /// The prefix llama.cpp's margins alone would require (reported).
    pub by_llama_cpp: usize,
}

/// `ids` against `reference` (llama.cpp's greedy ids), with llama.cpp's top-2 margins and the
/// f32 evaluation's margins at each of its steps.
pub fn agreement(
    ids: &[u32],
    reference: &[u32],
    llama_margins: &[f32],
    f32_margins: &[f32],
) -> Agreement {
    let agree = ids
        .iter()
        .zip(reference)
        .take_while(|(a, b)| a == b)
        .count();
    let first_tie = |margins: &[f32]| {
        margins
            .iter()
            .position(|&m| m < TIE_MARGIN)
            .unwrap_or(reference.len())
    };
    let by_llama_cpp = first_tie(llama_margins);
    Agreement {
        agree,
        required: by_llama_cpp.min(first_tie(f32_margins)),
        by_llama_cpp,
    }
}
