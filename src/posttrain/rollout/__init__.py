"""posttrain.rollout: sampling (`sampling`), generation (`generate`) and the rollout engines
(`engines`). The greedy cut-off lives here, torch-free, so that configs check temperatures by it."""

# A temperature below this decodes greedily (vLLM's cut-off): z / T overflows float32 once T < |z| / 3.4e38
# (1e-40 is inside OpenAI's [0, 2]), and at T = 1e-5 a logit 1e-4 below the top one is e^-10 as likely already.
GREEDY_BELOW = 1e-5


def is_greedy(temperature: float) -> bool:
    """Whether sampling picks the argmax at this temperature (`sampling.sample_next`): 0, or below GREEDY_BELOW."""
    return temperature < GREEDY_BELOW
