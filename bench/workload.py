"""The benchmark's jobs: mixed guidance (half need CFG), some negative prompts, distinct seeds."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Workload:
    model_dir: str
    jobs: int
    steps: int
    side: int
    max_batch: int
    cfg_scale: float  # the guidance of jobs that use CFG; the others use 0

    def requests(self, callback_url: str | None = None) -> list[dict]:
        requests = []
        for i in range(self.jobs):
            request = {
                "prompt": f"a watercolor painting of a harbour, study {i}",
                "seed": 10_000 + i,
                "guidance_scale": self.cfg_scale if i % 2 else 0.0,
                "num_inference_steps": self.steps,
                "width": self.side,
                "height": self.side,
            }
            if i % 4 == 1:
                request["negative_prompt"] = "blurry, low quality"
            if callback_url:
                request["callback_url"] = callback_url
            requests.append(request)
        return requests
