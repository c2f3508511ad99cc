"""python -m posttrain.config: print the README's config reference tables."""

import sys

from posttrain.config import (SFTConfig, evaluate_reference, markdown_reference, preference_reference,
                              quality_reference, redteam_reference, rl_reference, rlaif_reference,
                              synthesis_reference)
from posttrain.console import output_closed


def main() -> int:
    try:  # `python -m posttrain.config | head`: the reader may stop early
        print(markdown_reference(SFTConfig))
        print("\n## Config reference (rm and dpo: the sections that differ from SFT)\n")
        print(preference_reference())
        print("\n## Config reference (grpo, rloo and ppo: the sections that differ from SFT)\n")
        print(rl_reference())
        print("\n## Config reference (rlaif)\n")
        print(rlaif_reference())
        print("\n## Config reference (constitutional and self-instruct)\n")
        print(synthesis_reference())
        print("\n## Config reference (quality)\n")
        print(quality_reference())
        print("\n## Config reference (redteam)\n")
        print(redteam_reference())
        print("\n## Config reference (evaluate)\n")
        print(evaluate_reference())
        sys.stdout.flush()
    except BrokenPipeError:
        return output_closed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
