//! A failing or panicking step fails only the requests in that step; the
//! engine keeps serving the others.

use std::path::Path;
use std::time::Duration;

use llama_engine::runner::{ModelRunner, StepOutput};
use llama_engine::scheduler::StepPlan;
use llama_engine::tokenizer::Tokenizer;
use llama_engine::{start_with_runner, EngineConfig, EngineError, GenerateRequest, StreamEvent};
use llama_model::BlockAllocator;

const POISON_ERR: u32 = 31_000;
const POISON_PANIC: u32 = 31_001;
const VOCAB: usize = 32_000;

/// Always predicts token 500; fails (or panics) when a step carries a poison
/// token: at launch, or, for a step of more than one sequence, when its
/// output is collected.
#[derive(Default)]
struct Flaky {
    launched: Option<Result<StepOutput, String>>,
}

impl ModelRunner for Flaky {
    fn vocab_size(&self) -> usize {
        VOCAB
    }

    fn launch(&mut self, plan: &StepPlan) -> Result<(), String> {
        let output = self.run(plan);
        if plan.chunks.len() == 1 {
            output.as_ref().map_err(|e| fail(e.clone()))?;
        }
        self.launched = Some(output);
        Ok(())
    }

    fn collect(&mut self) -> Result<StepOutput, String> {
        self.launched.take().expect("a launched step").map_err(fail)
    }
}

const CRASH: &str = "simulated kernel crash";

/// A step's error, or its panic.
fn fail(message: String) -> String {
    if message == CRASH {
        panic!("{CRASH}");
    }
    message
}

impl Flaky {
    fn run(&mut self, plan: &StepPlan) -> Result<StepOutput, String> {
        let tokens = || plan.chunks.iter().flat_map(|c| c.tokens.iter().copied());
        if tokens().any(|t| t == POISON_PANIC) {
            return Err(CRASH.into());
        }
        if tokens().any(|t| t == POISON_ERR) {
            return Err("simulated device error".into());
        }
        let rows = plan.chunks.iter().filter(|c| c.sample).count();
        let mut logits = vec![0f32; rows * VOCAB];
        for r in 0..rows {
            logits[r * VOCAB + 500] = 10.0;
        }
        // Slow enough that requests overlap in the same steps.
        std::thread::sleep(Duration::from_millis(2));
        Ok(StepOutput {
            vocab: VOCAB,
            logits,
            ..StepOutput::default()
        })
    }
}

fn run(handle: &llama_engine::EngineHandle, prompt: Vec<u32>) -> Result<usize, EngineError> {
    let mut r = GenerateRequest::new(prompt, 20);
    r.stop.ignore_eos = true;
    let mut g = handle.submit(r).expect("queued");
    let mut tokens = 0;
    while let Some(ev) = g.blocking_next() {
        if let StreamEvent::Token { .. } = ev? {
            tokens += 1;
        }
    }
    Ok(tokens)
}

#[test]
fn a_failed_or_panicking_step_fails_only_its_requests() {
    fails_only_its_requests(false);
}

#[test]
fn a_failed_or_panicking_step_fails_only_its_requests_with_tokens_sent_during_steps() {
    fails_only_its_requests(true);
}

fn fails_only_its_requests(overlap: bool) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-llama");
    let tokenizer = Tokenizer::from_model_dir(&dir).unwrap();
    let alloc = BlockAllocator::new(256, 16).unwrap();
    let handle = start_with_runner(
        Box::new(Flaky::default()),
        alloc,
        tokenizer,
        vec![2],
        512,
        EngineConfig {
            overlap: Some(overlap),
            ..EngineConfig::default()
        },
    )
    .unwrap();

    assert_eq!(run(&handle, vec![1, 100, 200]).unwrap(), 20);
    for poison in [POISON_ERR, POISON_PANIC] {
        // A healthy request already decoding, then a poisoned one joins later steps.
        let h2 = handle.clone();
        let healthy = std::thread::spawn(move || run(&h2, vec![1, 300, 301, 302]));
        std::thread::sleep(Duration::from_millis(10));
        let err = run(&handle, vec![1, poison, 7]).unwrap_err();
        assert!(matches!(err, EngineError::Model(_)), "{err:?}");
        // The healthy request may have shared the failed step; if so it failed too, else it finished.
        match healthy.join().unwrap() {
            Ok(n) => assert_eq!(n, 20),
            Err(e) => assert!(matches!(e, EngineError::Model(_))),
        }
        // The engine is alive and serves new requests.
        assert!(handle.is_alive());
        assert_eq!(run(&handle, vec![1, 400]).unwrap(), 20);
    }
    // Gauges are published at the end of the step that sent the last event:
    // give the engine a moment, but a leak still fails.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let mut s = handle.stats();
    while (s.kv_blocks_used > 0 || s.running > 0) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
        s = handle.stats();
    }
    assert!(s.step_failures_total >= 2, "{s:?}");
    assert_eq!(s.kv_blocks_used, 0);
    assert_eq!(s.running, 0);
}
