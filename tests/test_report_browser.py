"""The arena's HTML report in a real browser (headless Chromium, tests/browser.py): it loads without errors, its
figures are drawn, its sortable tables sort when a header is clicked, and the optimizer and family checkboxes hide
and show what belongs to them.

The report is written from results made up here (no training): four optimizers of two families on one 2-D task
(with trajectories) and one model task, with a diverged lr and a target missed (a "–" in the tables). Skipped
without Chromium, unless THALWEG_BROWSER=required (CI), where a missing Chromium fails.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from typing import Any

import pytest

from browser import Browser, Page, require_chromium
from thalweg.arena import report
from thalweg.arena.protocol import GRID_MULTIPLIERS
from thalweg.arena.results import new_results
from thalweg.arena.tasks import get_task
from thalweg.factory import optimizer_class

DASH = "\u2013"  # what the report shows where there is no value
# Two optimizers of each of two families: enough for a family box to hide more than one optimizer and leave another
# family shown; more would only add panels for matplotlib to lay out (half a second each).
OPTIMIZERS = ["sgd", "momentum", "adam", "adamw"]
# Per task and optimizer: its final metric at its best lr (lower is better on both tasks), its steps to the target
# (None: missed, which the tables show as "–") and its lr centre, the best of its grid. The orders differ between
# columns, so that sorting by one has to move rows.
PLAN = {
    "rosenbrock": {"sgd": (0.008, 180, 1e-3), "momentum": (2e-4, 150, 1e-3), "adam": (1e-4, 60, 0.1),
                   "adamw": (0.003, 70, 0.1)},
    "logreg": {"sgd": (0.14, None, 1.0), "momentum": (0.085, 80, 0.1), "adam": (0.07, 30, 0.03),
               "adamw": (0.072, 40, 0.03)},
}
STEP_MS = {"sgd": 0.4, "momentum": 0.9, "adam": 1.2, "adamw": 0.7}
STATE_BYTES = {"sgd": 0.0, "momentum": 4.0, "adam": 8.0, "adamw": 8.0}  # their float32 buffers per element
# The families as the arena records them with each task (protocol.run_task, from each optimizer class's ``family``;
# "other" where a class has none, so that this module is still collected, and fails, without them).
FAMILIES = {name: getattr(optimizer_class(name), "family", "other") for name in OPTIMIZERS}


def _run(task: Any, steps: int, optimizer: str, lr: float, seed: int, phase: str, final: float | None,
         hit: int | None) -> dict[str, Any]:
    """One run record, shaped as protocol.run_one writes them; ``final`` None: diverged half-way."""
    diverged_at = steps // 2 if final is None else None
    done = steps if diverged_at is None else diverged_at
    start = 20.0 if task.kind == "2d" else 0.7
    end = final if final is not None else start * 30
    curve_steps = list(range(0, done, max(1, done // 40)))
    losses = [start * (end / start) ** (s / max(done, 1)) for s in curve_steps]
    eval_steps = sorted({*range(0, done + 1, task.eval_every), done})
    metrics = [start * (end / start) ** (s / max(done, 1)) for s in eval_steps]
    step_time = STEP_MS[optimizer] * 1e-3 * (1 + 0.01 * seed)
    record = {
        "optimizer": optimizer, "lr": lr, "seed": seed, "phase": phase, "hyperparams": {}, "sparse_grads": False,
        "steps": steps, "steps_done": done, "diverged": final is None, "diverged_at": diverged_at,
        "curve": {"step": curve_steps, "loss": losses}, "evals": {"step": eval_steps, "metric": metrics},
        "final_loss": final, "final_metric": final, "steps_to_target": hit, "step_time": step_time,
        "wall_time": done * step_time, "time_to_target": None if hit is None else hit * step_time,
        "state_bytes_per_param": STATE_BYTES[optimizer],
    }
    if task.kind == "2d":  # a path from the start towards (1, 1), bending through the valley
        n = 30
        record["trajectory"] = [[-1.2 + 2.2 * i / n, 1.0 - 0.8 * math.sin(math.pi * i / n) * (1 + seed * 0.1)]
                                for i in range(n + 1)]
    return record


def _task_entry(name: str, steps: int) -> dict[str, Any]:
    task = get_task(name)
    entry: dict[str, Any] = {
        "name": name, "description": task.description, "kind": task.kind, "metric": task.metric,
        "higher_is_better": task.higher_is_better, "target": task.target, "steps": steps,
        "log_metric": task.log_metric, "grid_multipliers": list(GRID_MULTIPLIERS), "families": dict(FAMILIES), "centres": {},
        "centre_source": {}, "coarse": {}, "extended": {}, "runs": [], "best_lr": {},
    }
    for optimizer, (best, hit, centre) in PLAN[name].items():
        entry["centres"][optimizer] = centre
        entry["centre_source"][optimizer] = "measured"
        entry["best_lr"][optimizer] = centre
        for m in GRID_MULTIPLIERS:
            lr = centre * m
            worse = best * (1 + 2 * abs(math.log10(m)))
            diverged = name == "rosenbrock" and optimizer == "sgd" and m == GRID_MULTIPLIERS[-1]
            entry["runs"].append(_run(task, steps, optimizer, lr, 0, "sweep", None if diverged else worse if m != 1 else best,
                                      hit if m == 1 else None))
        for seed in (1, 2):
            entry["runs"].append(_run(task, steps, optimizer, centre, seed, "seed", best * (1 + 0.05 * seed),
                                      None if hit is None else hit + 10 * seed))
    return entry


def fake_results() -> dict[str, Any]:
    config = {"tasks": list(PLAN), "optimizers": OPTIMIZERS, "seeds": 3, "budget": 0.05, "quick": False,
              "grid_multipliers": list(GRID_MULTIPLIERS), "backend": "reference", "jobs": 1}
    results = new_results(config, "2024-01-01T00:00:00")
    results["tasks"] = {"rosenbrock": _task_entry("rosenbrock", 200), "logreg": _task_entry("logreg", 100)}
    return results


def test_the_made_up_results_cover_what_the_checks_need() -> None:
    """Several optimizers per family and more than one family, both kinds of task, a diverged run and a missed
    target: without them the browser checks below would pass on nothing."""
    results = fake_results()
    assert len(set(FAMILIES.values())) >= 2 and max(Counter(FAMILIES.values()).values()) >= 2
    assert {t["kind"] for t in results["tasks"].values()} == {"2d", "model"}
    runs = [r for t in results["tasks"].values() for r in t["runs"]]
    assert any(r["diverged"] for r in runs) and any(r["steps_to_target"] is None and not r["diverged"] for r in runs)
    assert all("trajectory" in r for r in results["tasks"]["rosenbrock"]["runs"])
    json.dumps(results, allow_nan=False)  # as results.json would hold it


# ---------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def browser():
    require_chromium()
    with Browser() as b:
        yield b


@pytest.fixture(scope="module")
def report_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("browser") / "report"
    return report.write(fake_results(), out).as_uri()


@pytest.fixture
def page(browser: Browser, report_url: str):
    """The report, freshly loaded: no test sees another's clicks."""
    with browser.open(report_url) as page:
        yield page


def test_the_report_loads_without_console_errors_or_exceptions(page: Page) -> None:
    # What the page's scripts defer to after the load event (a timer, a frame) has run before the errors are read.
    page.evaluate("new Promise(done => requestAnimationFrame(() => setTimeout(done, 50)))")
    assert page.errors == []
    text = page.evaluate("document.body.innerText")
    assert all(name in text for name in [*OPTIMIZERS, *PLAN])  # the report itself, not an empty or error page


_FIGURES = """[...document.querySelectorAll('figure')].map(fig => ({
  html: fig.outerHTML.slice(0, 160),
  svgs: [...fig.querySelectorAll('svg')].filter(svg => !svg.parentElement.closest('svg')).map(svg => {
    const box = svg.getBoundingClientRect(); return [box.width, box.height]; }),
  imgs: [...fig.querySelectorAll('img')].map(img => [img.complete, img.naturalWidth, img.naturalHeight]),
}))"""


def test_every_figure_is_drawn(page: Page) -> None:
    """Each <figure> holds an inline SVG of some size or an image that loaded (and nothing broken besides)."""
    figures = page.evaluate(_FIGURES)
    assert len(figures) >= len(PLAN), figures  # every task has its figures
    for fig in figures:
        assert fig["svgs"] or fig["imgs"], f"a figure with neither an <svg> nor an <img>: {fig['html']}"
        assert all(w > 0 and h > 0 for w, h in fig["svgs"]), f"an <svg> of no size in {fig['html']}: {fig['svgs']}"
        assert all(done and w > 0 for done, w, _ in fig["imgs"]), f"an <img> that did not load in {fig['html']}"


_STYLED = """[...document.querySelectorAll('figure svg [class]')].slice(0, 400).map(el => {
  const rule = [...document.styleSheets].flatMap(sheet => [...sheet.cssRules])
    .find(r => r.selectorText === '.' + el.getAttribute('class'));
  if (!rule) return {missing: el.getAttribute('class')};
  const computed = getComputedStyle(el);
  return [...rule.style].map(prop => [prop, rule.style.getPropertyValue(prop), computed.getPropertyValue(prop)]);
})"""


def test_the_styles_moved_into_classes_still_apply(page: Page) -> None:
    """A figure's repeated style attributes become classes (figures._style_classes): each class has its rule, and
    the browser computes every property of it on the element (a grid line's stroke-opacity, a tick's colour)."""
    styled = page.evaluate(_STYLED)
    assert styled, "no figure element carries a class"
    checked = 0
    for entry in styled:
        assert not isinstance(entry, dict), f"a class without its rule: {entry}"
        for prop, declared, computed in entry:
            if prop in ("stroke-opacity", "stroke-width", "opacity", "fill-opacity"):
                assert abs(float(computed.removesuffix("px")) - float(declared.removesuffix("px"))) < 1e-6, (prop, declared, computed)
                checked += 1
    assert checked > 0


_TABLES = """[...document.querySelectorAll('table.sortable')].map((table, t) => {
  table.dataset.testTable = t;
  const heads = [...table.querySelectorAll('th')].filter(th => !table.tBodies[0] || !table.tBodies[0].contains(th));
  heads.forEach((th, k) => th.dataset.testHead = k);
  return heads.map(th => th.textContent.trim());
})"""

_COLUMN = """(([t, k]) => {
  const table = document.querySelector(`table[data-test-table="${t}"]`);
  const th = table.querySelector(`th[data-test-head="${k}"]`);
  const rows = [...table.tBodies[0].rows], column = th.cellIndex;
  return {sort: th.getAttribute('aria-sort'), cells: rows.map(row => row.cells[column].textContent.trim()),
          rows: rows.map(row => [...row.cells].map(cell => cell.textContent.trim()).join('|'))};
})(%s)"""


_NUMBER = re.compile(r"[-+\u2212]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _number(text: str) -> float | None:
    """The cell as a number when it shows one (not "nan", "inf", "1 of 5" or "3/5", which Python's float would take
    or which are no number)."""
    return float(text.replace("\u2212", "-")) if _NUMBER.fullmatch(text) else None


def _check_order(cells: list[str], sort: str, where: str) -> list[str]:
    """The column as the header says it is sorted: "–" cells last, the others in order when they are numbers.
    Returns the cells before the dashes."""
    assert sort in ("ascending", "descending"), f"{where}: aria-sort is {sort!r}"
    values = cells[:len(cells) - cells.count(DASH)]
    assert DASH not in values, f"{where} ({sort}): a {DASH} before a value: {cells}"
    numbers = [_number(v) for v in values]
    if None not in numbers:
        assert numbers == sorted(numbers, reverse=sort == "descending"), f"{where}: not {sort}: {cells}"
    return values


def test_clicking_a_header_sorts_its_table_by_that_column(page: Page) -> None:
    """Every column of every sortable table: the first click sorts it one way (aria-sort says which), the second
    the other way; numbers numerically, "–" last either way; the rows are the same rows."""
    tables = page.evaluate(_TABLES)
    assert tables, "no table.sortable in the report"
    reordered = with_dash = 0
    for t, heads in enumerate(tables):
        for k, head in enumerate(heads):
            where = f"table {t}, column {head!r}"
            before = page.evaluate(_COLUMN % json.dumps([t, k]))
            page.click(f'table[data-test-table="{t}"] th[data-test-head="{k}"]')
            first = page.evaluate(_COLUMN % json.dumps([t, k]))
            values = _check_order(first["cells"], first["sort"], where)
            page.click(f'table[data-test-table="{t}"] th[data-test-head="{k}"]')
            second = page.evaluate(_COLUMN % json.dumps([t, k]))
            assert {first["sort"], second["sort"]} == {"ascending", "descending"}, f"{where}: the second click did not reverse"
            assert _check_order(second["cells"], second["sort"], where) == values[::-1], f"{where}: not reversed"
            assert Counter(before["rows"]) == Counter(first["rows"]) == Counter(second["rows"]), f"{where}: rows changed"
            numbers = [_number(c) for c in before["cells"] if c != DASH]
            if len(set(numbers)) > 2 and None not in numbers and numbers not in (sorted(numbers), sorted(numbers)[::-1]):
                reordered += 1  # the click had to move rows: sorting is not just leaving them where they were
            with_dash += DASH in before["cells"] and len(values) > 0
    # Checks that can fail: a numeric column in no order to begin with, and a column mixing values and dashes.
    assert reordered > 0 and with_dash > 0, (reordered, with_dash)
    assert page.errors == []


_STATE = """(() => {
  const visible = {}, hidden = {};
  const boxes = Object.fromEntries([...document.querySelectorAll('input[type=checkbox][data-optimizer]')]
    .map(box => [box.dataset.optimizer, box.checked]));
  const families = [...document.querySelectorAll('input[type=checkbox][data-family]')].map(box => box.dataset.family);
  const counts = {};
  for (const el of document.querySelectorAll('[data-optimizer]')) {
    // the controls themselves (and a label holding one) are not what they hide
    if (el.matches('input') || el.querySelector('input[type=checkbox]')) continue;
    const name = el.dataset.optimizer;
    const shown = getComputedStyle(el).display !== 'none';
    (shown ? visible : hidden)[name] = ((shown ? visible : hidden)[name] || 0) + 1;
    const kind = el.matches('tr') ? 'rows' : el.matches('figure svg g') ? 'groups' : 'other';
    counts[name] = counts[name] || {rows: 0, groups: 0, other: 0};
    counts[name][kind] += 1;
  }
  return {visible, hidden, boxes, families, counts};
})()"""


def _state(page: Page) -> dict[str, Any]:
    return page.evaluate(_STATE)


def _assert_shown(state: dict[str, Any], shown: set[str], when: str) -> None:
    for name in OPTIMIZERS:
        if name in shown:
            assert name not in state["hidden"], f"{when}: {state['hidden'][name]} element(s) of {name} hidden"
            assert state["boxes"][name] is True, f"{when}: {name}'s box unchecked"
        else:
            assert name not in state["visible"], f"{when}: {state['visible'][name]} element(s) of {name} still shown"
            assert state["boxes"][name] is False, f"{when}: {name}'s box still checked"


def test_the_optimizer_checkboxes_hide_and_show_the_optimizers_rows_and_curves(page: Page) -> None:
    state = _state(page)
    assert sorted(state["boxes"]) == sorted(OPTIMIZERS), "one checkbox per optimizer"
    assert page.evaluate("document.querySelectorAll('input[type=checkbox][data-optimizer]').length") == len(OPTIMIZERS)
    for name in OPTIMIZERS:  # what the boxes act on is there to act on
        assert state["counts"][name]["rows"] > 0 and state["counts"][name]["groups"] > 0, (name, state["counts"])
    _assert_shown(state, set(OPTIMIZERS), "at first")
    for name in OPTIMIZERS:
        box = f'input[type=checkbox][data-optimizer="{name}"]'
        page.click(box)
        _assert_shown(_state(page), set(OPTIMIZERS) - {name}, f"{name} unchecked")
        page.click(box)
        _assert_shown(_state(page), set(OPTIMIZERS), f"{name} checked again")
    assert page.errors == []


def test_a_family_checkbox_hides_and_shows_its_optimizers(page: Page) -> None:
    families = sorted(set(FAMILIES.values()))
    assert sorted(_state(page)["families"]) == families, "one checkbox per family"
    for family in families:
        members = {name for name, f in FAMILIES.items() if f == family}
        box = f'input[type=checkbox][data-family="{family}"]'
        page.click(box)
        _assert_shown(_state(page), set(OPTIMIZERS) - members, f"family {family} unchecked")
        page.click(box)
        _assert_shown(_state(page), set(OPTIMIZERS), f"family {family} checked again")
    assert page.errors == []


def test_every_optimizer_group_in_a_figure_names_its_optimizer_on_hover(page: Page) -> None:
    groups = page.evaluate("""[...document.querySelectorAll('figure svg g[data-optimizer]')].map(g => {
        const title = g.querySelector(':scope > title');
        return [g.dataset.optimizer, title ? title.textContent : null];
    })""")
    assert {name for name, _ in groups} == set(OPTIMIZERS), groups
    for name, title in groups:
        assert title is not None and name in title, f"a group of {name} whose <title> is {title!r}"
