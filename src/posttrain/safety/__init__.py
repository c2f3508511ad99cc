"""Red-team and over-refusal evaluation of a chat model (`posttrain redteam`).

    probes    the prompts: bundled harmful and over-refusal suites, or your own file
    attacks   jailbreak templates that wrap a harmful request
    classify  labels for a response (full_compliance / partial_refusal / full_refusal):
              refusal patterns, or an LLM judge's messages and its parsed verdict
    metrics   rates with Wilson 95% intervals, errors counted apart
    run       the run itself; report: its Markdown
"""
