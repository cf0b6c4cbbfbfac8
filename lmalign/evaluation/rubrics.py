"""Judge rubrics (eval.judge.rubric): what the judge is asked about one answer, and how its
reply is read.

- `single` (`mt_bench`): FastChat's single-answer grading, 1-10: single-v1 for turn 1,
  single-v1-multi-turn for later turns (the last two turns shown, as FastChat's two-turn
  template holds), the -math- variants with the reference answer where the prompt has one.
  The rating is `[[N]]`, else FastChat's fallback `[N]`; none, or one off the scale, is invalid.
- `pairwise`: FastChat's pair-v2 prompts (and -math-, -multi-turn), the verdict `[[A]]`,
  `[[B]]` or `[[C]]` (tie); anything else is invalid.
- `criteria`: named criteria with scales and descriptions from the rubric's YAML, answered as one
  JSON object validated by a pydantic model built from them; that model's JSON schema is the
  `response_format` where the endpoint takes one.

Built-in rubrics are YAML files in lmalign/data/rubrics/; a user's file has the same shape.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from lmalign.errors import UserError, problem
from lmalign.evaluation.prompts import DATA, Prompt

RUBRICS = DATA / "rubrics"
NAMED = tuple(sorted(p.stem for p in RUBRICS.glob("*.yaml")))
RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
RATING_FALLBACK = re.compile(r"\[(\d+\.?\d*)\]")  # FastChat's backup pattern
CRITERION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class Criterion(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str
    scale: tuple[int, int] = (1, 5)


class RubricFile(BaseModel):
    """A rubric YAML file's shape."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["single", "pairwise", "criteria"]
    scale: tuple[int, int] = (1, 10)  # kind=single
    instructions: str | None = None  # kind=criteria: what the judge is told first
    criteria: dict[str, Criterion] = {}

    @model_validator(mode="after")
    def _consistent(self) -> RubricFile:
        if self.kind == "criteria" and not self.criteria:
            raise ValueError("kind: criteria needs at least one entry under criteria")
        bad = [name for name in self.criteria if not CRITERION_NAME.fullmatch(name)]
        if bad:
            raise ValueError(f"criterion names must be identifiers (letters, digits, _): {bad}")
        for name, low_high in [("scale", self.scale)] + [
                (f"criteria.{n}.scale", c.scale) for n, c in self.criteria.items()]:
            if low_high[0] >= low_high[1]:
                raise ValueError(f"{name}: {list(low_high)} must be [low, high] with low < high")
        return self


@dataclass(frozen=True)
class Rubric:
    name: str
    spec: RubricFile
    sha256: str  # of the rubric file and FastChat's prompts: part of a judge cell's identity
    templates: dict[str, dict[str, Any]]  # FastChat's judge prompts by name (single, pairwise)

    @property
    def kind(self) -> str:
        return self.spec.kind

    @cached_property
    def grades_model(self) -> type[BaseModel]:
        """kind=criteria: the pydantic model a judge's JSON answer must fit."""
        fields: dict[str, Any] = {
            name: (Annotated[int, Field(ge=c.scale[0], le=c.scale[1],
                                        description=c.description)], ...)
            for name, c in self.spec.criteria.items()}
        return create_model("Grades", __config__=ConfigDict(extra="forbid"), **fields)

    def response_format(self) -> dict[str, Any] | None:
        if self.kind != "criteria":
            return None
        schema = self.grades_model.model_json_schema()
        schema.pop("title", None)
        return {"type": "json_schema",
                "json_schema": {"name": "grades", "schema": schema, "strict": True}}


def load(name: str, key: str = "eval.judge.rubric") -> Rubric:
    """A built-in rubric by name or a rubric YAML file; a broken one is one error line naming
    `key` (where the rubric was set: eval.judge.rubric or synth.judge.rubric)."""
    import yaml

    path = RUBRICS / f"{name}.yaml" if name in NAMED else Path(name).expanduser()
    if not path.is_file():
        raise UserError(problem(key, name, "no such rubric or file",
                                f"{', '.join(NAMED)}, or a rubric YAML file",
                                f"{key}=mt_bench, or the file's path"))
    text = path.read_text()
    try:
        spec = RubricFile.model_validate(yaml.safe_load(text) or {})
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(problem(key, name, f"not valid YAML{where}",
                                "a YAML mapping (kind, criteria, ...)",
                                f"fix {path}, or copy {RUBRICS / 'answer_quality.yaml'}")) from None
    except ValidationError as exc:
        raise UserError([problem(
            key, name, f"{'.'.join(str(p) for p in error['loc']) or 'file'}: "
            f"{error['msg']}", "kind: single | pairwise | criteria; criteria: {name: "
            "{description, scale: [low, high]}}", f"fix {path}")
            for error in exc.errors()]) from None
    digest = hashlib.sha256(text.encode())
    templates: dict[str, dict[str, Any]] = {}
    if spec.kind != "criteria":
        fastchat = (DATA / "mt_bench" / "judge_prompts.jsonl").read_text()
        digest.update(fastchat.encode())
        templates = {t["name"]: t for t in (json.loads(line) for line in fastchat.splitlines()
                                            if line.strip())}
    return Rubric(name, spec, digest.hexdigest()[:16], templates)


def _reference(prompt: Prompt, turn: int) -> str | None:
    if prompt.reference and turn < len(prompt.reference) and prompt.reference[turn]:
        return prompt.reference[turn]
    return None


def _fastchat_messages(rubric: Rubric, prompt: Prompt, turn: int,
                       answers: list[list[str]]) -> list[dict[str, str]]:
    """FastChat's prompt for one turn: `answers` holds one list of per-turn answers (single) or
    two, A then B (pairwise)."""
    kind = rubric.kind
    first = max(turn - 1, 0)  # a later turn shows the last two, as FastChat's template holds
    with_reference = all(_reference(prompt, t) for t in range(first, turn + 1))
    name = ("single" if kind == "single" else "pair") + \
        ("-math-v1" if with_reference else ("-v1" if kind == "single" else "-v2")) + \
        ("-multi-turn" if turn > 0 else "")
    template = rubric.templates[name]
    fields: dict[str, str] = {}
    if turn == 0:
        fields["question"] = prompt.turns[0]
        if with_reference:
            fields["ref_answer_1"] = _reference(prompt, 0) or ""
        if kind == "single":
            fields["answer"] = answers[0][0]
        else:
            fields["answer_a"], fields["answer_b"] = answers[0][0], answers[1][0]
    else:
        for index, shown in ((1, first), (2, turn)):
            fields[f"question_{index}"] = prompt.turns[shown]
            if with_reference:
                fields[f"ref_answer_{index}"] = _reference(prompt, shown) or ""
            if kind == "single":
                fields[f"answer_{index}"] = answers[0][shown]
            else:
                fields[f"answer_a_{index}"] = answers[0][shown]
                fields[f"answer_b_{index}"] = answers[1][shown]
    return [{"role": "system", "content": template["system_prompt"]},
            {"role": "user", "content": template["prompt_template"].format(**fields)}]


def single_messages(rubric: Rubric, prompt: Prompt, turn: int,
                    answers: list[str]) -> list[dict[str, str]]:
    """answers: this sample's answer to every turn so far."""
    return _fastchat_messages(rubric, prompt, turn, [answers])


def pairwise_messages(rubric: Rubric, prompt: Prompt, turn: int, answers_a: list[str],
                      answers_b: list[str]) -> list[dict[str, str]]:
    return _fastchat_messages(rubric, prompt, turn, [answers_a, answers_b])


def criteria_messages(rubric: Rubric, prompt: Prompt, turn: int,
                      answers: list[str]) -> list[dict[str, str]]:
    spec = rubric.spec
    listed = "\n".join(f"- {name} ({c.scale[0]}-{c.scale[1]}): {c.description}"
                       for name, c in spec.criteria.items())
    shape = ", ".join(f'"{name}": <{c.scale[0]}-{c.scale[1]}>' for name, c in spec.criteria.items())
    system = (f"{(spec.instructions or '').strip()}\n\nCriteria:\n{listed}\n\nAnswer with one "
              f"JSON object and nothing else: {{{shape}}}").strip()
    parts = []
    if turn > 0:
        earlier = "\n".join(f"User: {prompt.turns[t]}\nAssistant: {answers[t]}"
                            for t in range(turn))
        parts.append(f"[Earlier turns]\n{earlier}")
    parts.append(f"[Question]\n{prompt.turns[turn]}")
    reference = _reference(prompt, turn)
    if reference:
        parts.append(f"[The Start of Reference Answer]\n{reference}\n"
                     "[The End of Reference Answer]")
    parts.append(f"[The Start of Assistant's Answer]\n{answers[turn]}\n"
                 "[The End of Assistant's Answer]")
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(parts)}]


def read_rating(text: str, scale: tuple[int, int]) -> tuple[float | None, str | None]:
    """(rating, None), or (None, why it is invalid)."""
    found = RATING.search(text) or RATING_FALLBACK.search(text)
    if not found:
        return None, "no [[rating]] in the judge's answer"
    rating = float(found.group(1))
    if not scale[0] <= rating <= scale[1]:
        return None, f"rating {found.group(1)} is outside {scale[0]}-{scale[1]}"
    return rating, None


def read_verdict(text: str) -> tuple[str | None, str | None]:
    """'A', 'B' or 'tie', as FastChat reads it; or (None, why it is invalid)."""
    for mark, verdict in (("[[A]]", "A"), ("[[B]]", "B"), ("[[C]]", "tie")):
        if mark in text:
            return verdict, None
    return None, "no [[A]], [[B]] or [[C]] verdict in the judge's answer"


def read_grades(rubric: Rubric, text: str) -> tuple[dict[str, int] | None, str | None]:
    """The criteria's scores from a JSON answer (the first {...} where there is other text)."""
    candidates = [text.strip()]
    found = re.search(r"\{.*\}", text, re.DOTALL)
    if found:
        candidates.append(found.group(0))
    reason = "no JSON object in the judge's answer"
    for candidate in candidates:
        try:
            document = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        try:
            return rubric.grades_model.model_validate(document).model_dump(), None
        except ValidationError as exc:
            first = exc.errors()[0]
            reason = (f"{'.'.join(str(p) for p in first['loc']) or 'answer'}: {first['msg']} "
                      f"({exc.error_count()} problem(s))")
    return None, reason
