"""Hypothesis strategies for malformed jobs: every one must fail alone, with the field named.

Each field gets values that are certainly invalid for it (out of range, wrong type under strict
validation, above the model's limits, unknown names). A malformed job keeps a valid callback URL unless
the callback itself is the broken field, so it must also produce a terminal `job.failed` webhook.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

from diffqueue.producer.models import MAX_SEED, GenerationRequest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

MODEL_ALIASES = {"sd"}
LORA_NAMES = {"style"}
MAX_STEPS, MAX_IMAGES = 50, 4  # the fault suite's models file

NOT_AN_INT = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.text(max_size=6),
                       st.lists(st.integers(), max_size=2))
LETTERS = st.text(alphabet="xyzw", min_size=1, max_size=6)  # never parses as a number or a date

INVALID_VALUES: dict[str, st.SearchStrategy] = {
    "prompt": st.one_of(st.just(""), st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=2),
                        st.just("p" * 10_001)),
    "seed": st.one_of(st.integers(max_value=-1), st.integers(min_value=MAX_SEED - 63), NOT_AN_INT),
    "guidance_scale": st.one_of(st.floats(max_value=-1e-3, allow_infinity=False),
                                st.floats(min_value=100.001, allow_infinity=False), LETTERS),
    "num_inference_steps": st.one_of(st.integers(max_value=0), st.integers(min_value=MAX_STEPS + 1), NOT_AN_INT),
    # odd: never a multiple of any VAE factor (the tiny model's is 2, full-size ones 8)
    "width": st.one_of(st.integers(max_value=7), st.integers(min_value=8193), st.sampled_from([1024, 2048]),
                       st.integers(min_value=9, max_value=127).filter(lambda v: v % 2), NOT_AN_INT),
    "height": st.one_of(st.integers(max_value=7), st.integers(min_value=8193), st.sampled_from([1024, 2048]),
                        NOT_AN_INT),
    "num_images": st.one_of(st.integers(max_value=0), st.integers(min_value=MAX_IMAGES + 1), NOT_AN_INT,
                            st.none()),
    "mode": st.one_of(LETTERS, st.integers()),
    "model": st.one_of(st.text(min_size=1, max_size=12).filter(lambda m: m not in MODEL_ALIASES), st.integers()),
    "output_format": st.one_of(LETTERS, st.integers()),
    "strength": st.one_of(st.floats(min_value=1.001, allow_infinity=False), st.floats(max_value=0.0,
                          allow_infinity=False), LETTERS),
    "loras": st.one_of(st.just([{"name": "no-such-lora"}]), st.just([{"name": "style", "scale": 11}]),
                       st.just([{"name": "style"}, {"name": "style"}]), st.just([{}]), LETTERS),
    "expires_at": st.one_of(LETTERS, st.lists(st.integers(), min_size=1, max_size=2)),
    "metadata": st.one_of(st.lists(st.integers(), max_size=2), st.integers(), LETTERS),
    "callback_url": st.one_of(st.just("ftp://example.com/hook"), st.just("not a url"), st.integers()),
    "image_url": st.one_of(st.just("not a url"), st.integers()),
}
KNOWN_FIELDS = set(GenerationRequest.model_fields)
EXTRA_FIELD = st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=10).filter(
    lambda name: name not in KNOWN_FIELDS)


@dataclass(frozen=True)
class Malformed:
    """One bad message: the task's args and kwargs, and what its failure must say."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    field: str | None = None  # the field the error must name, when there is one
    has_callback: bool = False  # whether a job.failed webhook is expected


@st.composite
def bad_field(draw, callback_url: str) -> Malformed:
    name = draw(st.sampled_from(sorted(INVALID_VALUES)))
    request = {"prompt": "fault suite", "seed": draw(st.integers(0, 1000)), "callback_url": callback_url,
               name: draw(INVALID_VALUES[name])}
    return Malformed(kwargs={"request": request}, field=name, has_callback=name != "callback_url")


@st.composite
def extra_field(draw, callback_url: str) -> Malformed:
    name = draw(EXTRA_FIELD)
    value = draw(st.one_of(st.integers(), st.text(max_size=5), st.none()))
    return Malformed(kwargs={"request": {"prompt": "x", "callback_url": callback_url, name: value}}, field=name,
                     has_callback=True)


JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5))
MALFORMED_SHAPES = st.one_of(
    st.builds(lambda v: Malformed(kwargs={"request": v}, field="request"),
              st.one_of(JSON_SCALARS, st.lists(JSON_SCALARS, max_size=3))),
    st.builds(lambda kw: Malformed(kwargs=kw),
              st.dictionaries(st.text(alphabet="abcdef", min_size=1, max_size=5), JSON_SCALARS, min_size=1,
                              max_size=3)),
    st.builds(lambda args: Malformed(args=tuple(args), field="request"),
              st.lists(JSON_SCALARS, min_size=1, max_size=3)),
)


def malformed_messages(count: int, callback_url: str) -> list[Malformed]:
    """`count` malformed messages drawn by hypothesis, the same ones on every run (derandomized)."""
    drawn: list[Malformed] = []

    @settings(max_examples=count, database=None, derandomize=True, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(st.one_of(bad_field(callback_url), bad_field(callback_url), extra_field(callback_url), MALFORMED_SHAPES))
    def collect(message: Malformed) -> None:
        drawn.append(message)

    collect()
    return drawn
