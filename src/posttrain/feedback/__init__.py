"""AI feedback: models judging, critiquing and writing data for other models.

    client.py          chat backends: any OpenAI-compatible endpoint (retries, backoff, rate limit,
                       token counts) or a model loaded in this process; make_backend(BackendConfig)
    jobs.py            JsonlLog (append-only, fsynced, resumable) and run_items (thread pool,
                       progress line, summary): what every pipeline here writes its output with
    judge.py           pairwise judge: rubric prompt, strict verdict parsing, both orders asked
                       and combined (position-swap debiasing), agreement statistics
    rlaif.py           posttrain rlaif: N responses per prompt, every pair judged, a preference
                       dataset with provenance for posttrain dpo / rm
    constitutional.py  critique and revision against principles (Constitutional AI)
    self_instruct.py   new instructions bootstrapped from seed tasks (Self-Instruct)
    rouge.py           ROUGE-L, for filtering near-duplicate instructions

Nothing heavy is imported here; torch loads only when a local model is used.
"""
