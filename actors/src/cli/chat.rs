//! `rocmforge chat`: an interactive session using the model's chat template. The KV cache is
//! kept across turns: each turn re-renders the whole conversation and only the tokens after
//! the longest cached prefix are prefilled.

use super::run::{load, GenError, Loaded, ModelArgs, SamplingArgs, TextSink};
use clap::Args;
use rocmforge::model::{self, SequenceConfig, StopReason};
use rocmforge::sample::Sampler;
use rocmforge::tokenizer::ChatMessage;
use std::io::{BufRead, Write};
use std::ops::ControlFlow;

#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Optional system message.
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens per reply.
    #[arg(short = 'n', long = "n-predict", default_value_t = 512)]
    pub n_predict: usize,
}

pub fn run(a: ChatArgs) -> Result<(), Box<dyn std::error::Error>> {
    let Loaded {
        model,
        tokenizer: tok,
        pool,
        ..
    } = load(&a.model)?;
    let mut seq = model
        .new_sequence(SequenceConfig {
            ctx: Some(a.model.ctx),
            precision: a.model.precision,
            kv_type: None,
        })
        .map_err(GenError::from)?;
    let mut sampler = Sampler::new(a.sampling.params());
    let mut messages: Vec<ChatMessage> = a
        .system
        .iter()
        .map(|s| ChatMessage::new("system", s.clone()))
        .collect();
    // Tokens whose keys and values are in `seq` (its first `seq.pos()` tokens).
    let mut cached: Vec<u32> = Vec::new();
    eprintln!(
        "chat with {} — /reset clears the conversation, /exit or Ctrl-D quits",
        a.model.model.display()
    );
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        eprint!("> ");
        std::io::stderr().flush()?;
        line.clear();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let input = line.trim_end_matches(['\n', '\r']);
        match input.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                messages.retain(|m| m.role == "system");
                cached.clear();
                seq.reset();
                continue;
            }
            _ => {}
        }
        messages.push(ChatMessage::new("user", input));
        let prompt = tok
            .apply_chat_template(&messages, true)
            .map_err(GenError::from)?;
        let context = tok.encode(&prompt, true, true).map_err(GenError::from)?;
        // Reuse the cached prefix; at least one token must be fed to get logits.
        let keep = cached
            .iter()
            .zip(&context)
            .take_while(|(a, b)| a == b)
            .count()
            .min(context.len().saturating_sub(1));
        seq.truncate(keep);
        if let Err(e) = seq.check_room(context.len() - keep + 1) {
            eprintln!("{e}; use /reset");
            messages.pop();
            continue;
        }
        let mut sink = TextSink::new(&tok, &a.sampling.stop);
        let mut err = None;
        let generation = pool.install(|| {
            model::generate(
                &model,
                &mut seq,
                &mut sampler,
                &context,
                a.n_predict,
                |id| tok.is_eog(id),
                |id| match sink.push(id) {
                    Ok((piece, stop)) => {
                        let mut out = std::io::stdout();
                        if let Err(e) = out.write_all(piece.as_bytes()).and_then(|_| out.flush()) {
                            err = Some(GenError::from(e));
                            return ControlFlow::Break(());
                        }
                        if stop {
                            ControlFlow::Break(())
                        } else {
                            ControlFlow::Continue(())
                        }
                    }
                    Err(e) => {
                        err = Some(e);
                        ControlFlow::Break(())
                    }
                },
            )
        });
        if let Some(e) = err {
            return Err(e.into());
        }
        let g = generation.map_err(GenError::from)?;
        let tail = sink.finish().to_string();
        println!("{tail}");
        // The cache now holds the context and every generated token but the last.
        cached = context;
        cached.extend_from_slice(&g.ids[..g.ids.len().saturating_sub(1)]);
        if g.stop_reason == StopReason::Context {
            eprintln!("[context full: use /reset]");
        }
        eprintln!(
            "[{} prompt tokens at {:.1} tok/s, {} tokens at {:.1} tok/s]",
            g.timings.prompt_tokens,
            g.timings.prompt_tokens_per_second,
            g.ids.len(),
            g.timings.decode_tokens_per_second
        );
        messages.push(ChatMessage::new("assistant", sink.text.trim()));
    }
    Ok(())
}
