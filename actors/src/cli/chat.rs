//! `rocmforge chat`: an interactive session using the model's chat template, through the
//! engine on any backend. The conversation is a runtime session: its KV cache is kept across
//! turns, so each turn re-renders the whole conversation and the runtime prefills only the
//! tokens after the prefix it already holds.

use super::engine::{Engine, EngineArgs};
use super::generate::generate;
use super::run::{GenError, ModelArgs, SamplingArgs, TextSink};
use clap::Args;
use rocmforge::tokenizer::ChatMessage;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set by Ctrl-C; a reply in progress stops at its next piece of text, the session goes on.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

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
    /// cpu, cuda, hip or auto (a GPU when one opens, else the CPU).
    #[arg(long, default_value = "auto")]
    pub backend: rocmforge::backend::BackendKind,
    #[command(flatten)]
    pub engine: EngineArgs,
}

pub fn run(a: ChatArgs) -> Result<(), Box<dyn std::error::Error>> {
    let engine = Engine::open(&a.model, a.backend, &a.engine, false)?;
    // The first prompt appears once the weights are in place.
    super::progress::LoadProgressBars::show(&engine.rt).wait();
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe; it replaces the
    // default action (ending the process) for this interactive command only.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
    let tok = &engine.tokenizer;
    // One seed for the whole conversation (drawn now when none was given).
    let sampling = a.sampling.params();
    tracing::info!(seed = ?sampling.seed, "sampling");
    let mut session = engine.rt.new_session();
    let mut messages: Vec<ChatMessage> = a
        .system
        .iter()
        .map(|s| ChatMessage::new("system", s.clone()))
        .collect();
    eprintln!(
        "chat with {} on {} — /help for commands, /bye or Ctrl-D quits",
        a.model.model.display(),
        engine.backend,
    );
    let mut input_lines = Input::open();
    loop {
        let line = match input_lines.read()? {
            Line::Text(l) => l,
            // Ctrl-C at the prompt: the line is dropped, the session goes on.
            Line::Cleared => continue,
            Line::End => {
                eprintln!();
                break;
            }
        };
        let input = line.as_str();
        match input.trim() {
            "" => continue,
            "/exit" | "/quit" | "/bye" => break,
            "/reset" | "/clear" => {
                messages.retain(|m| m.role == "system");
                // A new session: the old one's cache is dropped when the runtime needs room.
                session = engine.rt.new_session();
                continue;
            }
            "/help" => {
                eprintln!(
                    "/clear (or /reset)  forget the conversation (the system message stays)\n\
                     /system TEXT        set the system message and start over\n\
                     /bye (or /exit)     quit; Ctrl-D too\n\
                     Ctrl-C              stop the reply being written"
                );
                continue;
            }
            cmd if cmd.starts_with("/system") => {
                let text = cmd["/system".len()..].trim();
                messages.clear();
                if !text.is_empty() {
                    messages.push(ChatMessage::new("system", text));
                }
                session = engine.rt.new_session();
                continue;
            }
            cmd if cmd.starts_with('/') => {
                eprintln!("unknown command {cmd}: /help lists them");
                continue;
            }
            _ => {}
        }
        messages.push(ChatMessage::new("user", input));
        let prompt = tok
            .apply_chat_template(&messages, true)
            .map_err(GenError::from)?;
        let context = tok.encode(&prompt, true, true).map_err(GenError::from)?;
        let mut sink = TextSink::new(tok, &a.sampling.stop);
        let cached_before = engine.rt.stats().prompt_tokens_cached;
        // A Ctrl-C typed at the prompt does not stop the next reply.
        INTERRUPTED.store(false, Ordering::SeqCst);
        let turn = generate(
            &engine,
            &context,
            a.n_predict,
            &sampling,
            Some(session),
            None,
            &mut sink,
            |piece| {
                if INTERRUPTED.swap(false, Ordering::SeqCst) {
                    return Err(GenError::Interrupted);
                }
                let mut out = std::io::stdout();
                out.write_all(piece.as_bytes())?;
                out.flush()?;
                Ok(())
            },
        );
        let turn = match turn {
            Ok(t) => t,
            // Ctrl-C: the reply so far stays in the conversation (dropping the stream cancelled
            // the request); the next turn prefills it again.
            Err(e) if matches!(e.downcast_ref(), Some(GenError::Interrupted)) => {
                println!();
                eprintln!("[stopped]");
                messages.push(ChatMessage::new("assistant", sink.text.trim()));
                continue;
            }
            // A turn the runtime refuses (the conversation outgrew the context) is reported
            // and the session goes on; anything else ends it.
            Err(e) if matches!(e.downcast_ref(), Some(crate::RuntimeError::BadRequest(_))) => {
                eprintln!("\n[{e}; use /reset]");
                messages.pop();
                continue;
            }
            Err(e) => {
                input_lines.save_history();
                return Err(e);
            }
        };
        println!("{}", sink.finish());
        if turn.stop_reason == rocmforge::model::StopReason::Context {
            eprintln!("[context full: use /reset]");
        }
        let t = &turn.timings;
        eprintln!(
            "[{} prompt tokens ({} cached) at {:.1} tok/s, {} tokens at {:.1} tok/s]",
            t.prompt_tokens,
            engine.rt.stats().prompt_tokens_cached - cached_before,
            t.prompt_tokens_per_second,
            turn.ids.len(),
            t.decode_tokens_per_second
        );
        messages.push(ChatMessage::new("assistant", sink.text.trim()));
    }
    input_lines.save_history();
    engine.finish()?;
    Ok(())
}

/// One read at the prompt.
enum Line {
    Text(String),
    /// Ctrl-C on a terminal: the line being typed is dropped.
    Cleared,
    /// Ctrl-D or the end of piped input.
    End,
}

/// Where the user's lines come from: on a terminal a line editor (arrows, Emacs keys, history
/// kept in `chat_history` under the data directory); otherwise plain lines, so piped input
/// (scripts, the tests) reads exactly what was sent.
enum Input {
    Editor {
        editor: Box<rustyline::DefaultEditor>,
        history: Option<PathBuf>,
    },
    Plain(std::io::Stdin),
}

impl Input {
    fn open() -> Self {
        use std::io::IsTerminal;
        if std::io::stdin().is_terminal() && std::io::stdout().is_terminal() {
            let config = rustyline::Config::builder()
                .max_history_size(1000)
                .and_then(|b| b.history_ignore_dups(true))
                .map(|b| b.history_ignore_space(true).build());
            match config.and_then(rustyline::DefaultEditor::with_config) {
                Ok(mut editor) => {
                    let history = super::models::data_dir().map(|d| d.join("chat_history"));
                    // No history yet is the usual first run, not an error.
                    if let Some(h) = &history {
                        let _ = editor.load_history(h);
                    }
                    return Self::Editor {
                        editor: Box::new(editor),
                        history,
                    };
                }
                Err(e) => tracing::warn!("no line editing ({e}); reading plain lines"),
            }
        }
        Self::Plain(std::io::stdin())
    }

    fn read(&mut self) -> std::io::Result<Line> {
        use rustyline::error::ReadlineError;
        match self {
            Self::Editor { editor, .. } => match editor.readline("> ") {
                Ok(line) => {
                    if !line.trim().is_empty() {
                        let _ = editor.add_history_entry(line.as_str());
                    }
                    Ok(Line::Text(line))
                }
                Err(ReadlineError::Interrupted) => Ok(Line::Cleared),
                Err(ReadlineError::Eof) => Ok(Line::End),
                Err(ReadlineError::Io(e)) => Err(e),
                Err(e) => Err(std::io::Error::other(e)),
            },
            Self::Plain(stdin) => {
                eprint!("> ");
                std::io::stderr().flush()?;
                let mut line = String::new();
                if stdin.lock().read_line(&mut line)? == 0 {
                    return Ok(Line::End);
                }
                line.truncate(line.trim_end_matches(['\n', '\r']).len());
                Ok(Line::Text(line))
            }
        }
    }

    /// Writes the history file (creating the data directory); a failure is only logged.
    fn save_history(&mut self) {
        if let Self::Editor {
            editor,
            history: Some(h),
        } = self
        {
            if let Some(d) = h.parent() {
                let _ = std::fs::create_dir_all(d);
            }
            if let Err(e) = editor.save_history(h) {
                tracing::warn!("chat history {}: {e}", h.display());
            }
        }
    }
}
