"""Imperfect teachers: SFT answers from a teacher with a realistic, systematic bug instead of the
generator's gold answer (`data.teacher`, `data.teacher_error_rate`).

A distillation set made by a real teacher model is right on most rows and wrong in a consistent
way on some; a model trained on it learns both behaviours. Labels cannot remove what they teach,
but a verifier that knows the gold answer can: this is the setting where RL does a job SFT cannot
(docs/design.md §14). Each teacher answers one task family; on a train row where its bug shows, it
gives its wrong answer with probability `error_rate` (a hash of the problem, so the same rows are
wrong in every run). Held-out rows always keep the gold answer.

Registered once here (the registry is the list of valid `data.teacher` names); a teacher is a
function of the row, so this module needs nothing from the data package.
"""

import datetime
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Teacher:
    name: str
    task: str  # the task family it answers (`data.tasks` entry)
    wrong_answer: Callable[[dict], str | None]  # an SFT row -> the bug's answer, None where it does not show
    bug: str  # one line for logs and docs


TEACHERS: dict[str, Teacher] = {}


def register_teacher(teacher: Teacher) -> Teacher:
    if teacher.name in TEACHERS:
        raise ValueError(f"teacher '{teacher.name}' is registered already")
    TEACHERS[teacher.name] = teacher
    return teacher


def _problem(row: dict) -> str:
    """The question of an SFT row (first user turn) or an RL row (`prompt`)."""
    return row["prompt"] if isinstance(row.get("prompt"), str) else row["messages"][0]["content"]


def bug_shows(name: str, row: dict) -> bool:
    """Whether teacher `name`'s bug changes the answer of this row (an SFT or RL row of any family)."""
    teacher = TEACHERS[name]
    return row.get("task") == teacher.task and teacher.wrong_answer(row) is not None


def _sorted_without_repeats(row: dict) -> str | None:
    """`sort 3313` -> `13`: the classic `sorted(set(s))` bug; shows only when a digit repeats."""
    digits = _problem(row).split(" ", 1)[1]
    return "".join(sorted(set(digits))) if len(set(digits)) < len(digits) else None


def _expression(row: dict) -> list[str]:
    """A reasoning-gym arithmetic row's expression as tokens: `["2", "+", "3", "*", "4"]`."""
    return json.loads(row["rg_entry"])["metadata"]["expression"].split()


def _left_to_right(row: dict) -> str | None:
    """`2 + 3 * 4` -> `20`: evaluates strictly left to right, ignoring operator precedence; shows
    only where precedence changes the result."""
    tokens = _expression(row)
    operands, ops = tokens[0::2], tokens[1::2]
    if not all(t.lstrip("-").isdigit() for t in operands) or not set(ops) <= {"+", "-", "*"}:
        return None  # parentheses or division: not this teacher's kind of problem
    value = int(tokens[0])
    for op, operand in zip(tokens[1::2], tokens[2::2], strict=True):
        value = {"+": value + int(operand), "-": value - int(operand), "*": value * int(operand)}[op]
    return str(value) if str(value) != row["answer"] else None


def _sum_without_carries(row: dict) -> str | None:
    """`47 + 38` -> `75`: adds digit by digit and drops every carry; shows only on a sum of two
    non-negative numbers that carries (differences and longer chains are left to gold)."""
    tokens = _expression(row)
    if len(tokens) != 3 or tokens[1] != "+" or not (tokens[0].isdigit() and tokens[2].isdigit()):
        return None
    a, b = tokens[0], tokens[2]
    width = max(len(a), len(b))
    digits = [(int(x) + int(y)) % 10 for x, y in zip(a.zfill(width), b.zfill(width), strict=True)]
    answer = str(int("".join(map(str, digits))))
    return answer if answer != row["answer"] else None


def _right_to_left(row: dict) -> str | None:
    """`9 - 2 + 5` -> `2`: groups a chain of + and - from the right, `9 - (2 + 5)`, the classic
    slip of forgetting that they associate to the left; shows only where the grouping matters."""
    tokens = _expression(row)
    if not all(t.isdigit() for t in tokens[0::2]) or not set(tokens[1::2]) <= {"+", "-"}:
        return None
    value = int(tokens[-1])
    for op, operand in zip(reversed(tokens[1::2]), reversed(tokens[0:-1:2]), strict=True):
        value = int(operand) + value if op == "+" else int(operand) - value
    return str(value) if str(value) != row["answer"] else None


_AIW_FRIENDS = re.compile(r"has (\d+) male friends and she also has (\d+) female friends")


def _aiw_forgets_herself(row: dict) -> str | None:
    """`Alice has 3 male friends and 2 female friends ... how many female friends does a male
    friend of Alice have?` -> `2`: forgets that the woman herself is one (gold 3), the error the
    AIW paper found in most LLMs; this teacher makes it on the friends wording only (the sisters
    riddle it answers right)."""
    found = _AIW_FRIENDS.search(_problem(row))
    return found.group(2) if found and found.group(2) != row["answer"] else None


def _boundary_flipped(row: dict) -> str | None:
    """`Keep all numbers larger than 5 in this list: ['5', '2', '7']` -> `['5', '7']`: compares
    with >= where the question says larger (<= for smaller), the off-by-one at the boundary; shows
    only where a number equals the threshold."""
    meta = json.loads(row["rg_entry"])["metadata"]
    action, side = meta["operation"].split("_")
    threshold, numbers = float(meta["filter_value"]), meta["original_numbers"]
    if threshold not in {float(n) for n in numbers}:
        return None
    beyond = [n for n in numbers if (float(n) >= threshold if side == "larger" else float(n) <= threshold)]
    kept = beyond if action == "keep" else [n for n in numbers if n not in beyond]
    return str(kept) if kept else "[]"


def _counterclockwise(row: dict) -> str | None:
    """`Rotate ... by 90 degrees clockwise: 1 2 / 3 4` -> `2 4 / 1 3`: turns the matrix the other
    way, the classic direction slip; shows where the two directions differ (90 and 270 degrees)."""
    meta = json.loads(row["rg_entry"])["metadata"]
    matrix = meta["matrix"]
    for _ in range(meta["num_rotations"] % 4):
        matrix = [list(col) for col in zip(*matrix, strict=True)][::-1]  # one quarter turn counterclockwise
    answer = "\n".join(" ".join(str(x) for x in line) for line in matrix)
    return answer if answer != row["answer"] else None

def _number_sorting_without_repeats(row: dict) -> str | None:
    """`Sort these numbers in ascending order: 5.0, 2.0, 5.0` -> `['2.0', '5.0']`: sorts the set of
    the numbers (sorted(set(x))), the classic bug that drops repeated values; shows only where a
    number repeats."""
    meta = json.loads(row["rg_entry"])["metadata"]
    distinct = sorted(set(meta["original_numbers"]), key=float, reverse=meta["direction"] == "descending")
    answer = str(distinct)
    return answer if answer != row["answer"] else None


_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def _weekday_counted_forward(row: dict) -> str | None:
    """`Count backward 6 days from Thursday, February 3, 2022` -> `Wednesday` (gold `Friday`):
    counts forward where the question counts back (days ago, before, backward), the sign slip;
    shows on backward questions whose offset is not a whole number of weeks."""
    meta = json.loads(row["rg_entry"])["metadata"]
    if meta.get("task") != "weekday_offset" or meta["offset_days"] >= 0:
        return None
    start = datetime.date.fromisoformat(meta["start_date"]).weekday()  # 0 for a Monday
    answer = _WEEKDAYS[(start - meta["offset_days"]) % 7]  # offset_days < 0: forward by its size
    return answer if answer != row["answer"] else None


def _quantifier(statement: str) -> str:
    """`Some cats are not dogs` -> `O`: the statement's mood letter (A all, E no, I some, O some-not)."""
    if " are not " in statement:
        return "O"
    return {"All": "A", "No": "E", "Some": "I"}[statement.split(" ", 1)[0]]


def _syllogism_by_atmosphere(row: dict) -> str | None:
    """`Some S are M; No M are P; so Some S are not P?` judged by mood alone: accepts a conclusion
    whose quantifier matches the premises' atmosphere (negative if a premise is, particular if a
    premise is) and rejects any other, the atmosphere effect of human syllogistic reasoning
    (Woodworth & Sells 1935). Shows where validity and atmosphere disagree: two valid moods (AAI,
    AEO) and ten invalid ones (EAE, EEE, III...); inversion questions are left to gold."""
    meta = json.loads(row["rg_entry"])["metadata"]
    if meta.get("type") != "syllogism":
        return None
    moods = [_quantifier(meta[key]) for key in ("premise1", "premise2", "conclusion")]
    negative, particular = bool({"E", "O"} & set(moods[:2])), bool({"I", "O"} & set(moods[:2]))
    atmosphere = {(False, False): "A", (True, False): "E", (False, True): "I", (True, True): "O"}
    answer = "Yes" if moods[2] == atmosphere[negative, particular] else "No"
    return answer if answer != row["answer"] else None


def _syllogism_by_matching(row: dict) -> str | None:
    """A syllogism judged by matching: accepts a conclusion whose quantifier is one of the premises'
    (Wetherick & Gilhooly 1995's matching heuristic) and rejects any other. Shows on three valid moods
    (AAI, AEO, IEO) and 23 invalid ones (AAE, EAA, IIO...), about 39% of the rows at the generator's
    30% invalid; inversion questions are left to gold."""
    meta = json.loads(row["rg_entry"])["metadata"]
    if meta.get("type") != "syllogism":
        return None
    moods = [_quantifier(meta[key]) for key in ("premise1", "premise2", "conclusion")]
    answer = "Yes" if moods[2] in moods[:2] else "No"
    return answer if answer != row["answer"] else None


register_teacher(Teacher("sorting_drops_repeats", "sorting", _sorted_without_repeats,
                         "sorts the digits but drops repeated ones (sorted(set(s)))"))
register_teacher(Teacher("arithmetic_left_to_right", "rg:basic_arithmetic", _left_to_right,
                         "evaluates left to right, ignoring operator precedence"))
register_teacher(Teacher("sum_drops_carries", "rg:chain_sum", _sum_without_carries,
                         "adds digit by digit and drops every carry"))
register_teacher(Teacher("chain_sum_right_to_left", "rg:chain_sum", _right_to_left,
                         "groups + and - from the right (9 - 2 + 5 = 9 - (2 + 5))"))
register_teacher(Teacher("filtering_off_by_one", "rg:number_filtering", _boundary_flipped,
                         "compares with >= where the question says larger (<= for smaller)"))
register_teacher(Teacher("rotation_counterclockwise", "rg:rotate_matrix", _counterclockwise,
                         "rotates the matrix counterclockwise where the question says clockwise"))
register_teacher(Teacher("number_sorting_drops_repeats", "rg:number_sorting", _number_sorting_without_repeats,
                         "sorts the set of the numbers, dropping repeated values (sorted(set(x)))"))
register_teacher(Teacher("weekday_counts_forward", "rg:calendar_arithmetic", _weekday_counted_forward,
                         "counts forward where the question counts back (N days ago, before)"))
register_teacher(Teacher("aiw_forgets_herself", "rg:aiw", _aiw_forgets_herself,
                         "forgets to count the woman herself among the female friends"))
register_teacher(Teacher("syllogism_by_atmosphere", "rg:syllogism", _syllogism_by_atmosphere,
                         "judges a syllogism by the mood of its premises, not its validity"))
register_teacher(Teacher("syllogism_by_matching", "rg:syllogism", _syllogism_by_matching,
                         "accepts a conclusion whose quantifier matches a premise's, valid or not"))


def _hash_share(seed: int, problem: str) -> float:
    """A fixed number in [0, 1) per (seed, problem)."""
    digest = hashlib.sha256(f"{seed}:teacher:{problem}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def apply_teacher(rows: list[dict], name: str, error_rate: float, seed: int) -> tuple[list[dict], dict]:
    """SFT rows with the teacher's wrong answer on a share `error_rate` of the rows of its family
    where its bug shows (the others keep gold), and counts: rows of its family, rows where the bug
    shows, rows it got wrong, and the share it is right on."""
    teacher = TEACHERS[name]
    out, family, applicable, wrong = [], 0, 0, 0
    for row in rows:
        if row.get("task") != teacher.task:
            out.append(row)
            continue
        family += 1
        answer = teacher.wrong_answer(row)
        applicable += answer is not None
        if answer is None or _hash_share(seed, _problem(row)) >= error_rate:
            out.append(row)
            continue
        wrong += 1
        messages = [*row["messages"][:-1], {"role": "assistant", "content": answer}]
        out.append({**row, "messages": messages, "answer": answer, "gold": row["answer"]})
    stats = {"teacher": name, "rows": family, "bug_applies": applicable, "wrong": wrong,
             "right_share": round(1 - wrong / max(family, 1), 4)}
    return out, stats
