"""Multi-page objects (`<Image valueList="$pages">`): every page of a task predicted, regions with item_index.

Label Studio shows such an image tag as one page at a time of the task's list of URLs and stores each
region with `item_index`, the page it lies on. The runtime predicts a task of N pages as N tasks, each
with one page as the tag's value (so batching, admission and every family work as for one image), and
answers the task with the regions of all its pages, each marked with its page; regions of the config's
other objects come from the first page's run alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from serving.contract import ObjectTag
from serving.inference.call import Call


def page_objects(objects: Mapping[str, ObjectTag]) -> dict[str, str]:
    """Return {object name: data key} of the objects whose value is a list of pages (valueList)."""
    out = {}
    for obj in objects.values():
        if any(str(k).lower() == "valuelist" for k in obj.attrs) and obj.value_key:
            out[obj.name] = obj.value_key
    return out


@dataclass(frozen=True)
class Pages:
    """How a call's tasks were split into pages: page task j is page `page[j]` of task `owner[j]`."""

    objects: dict[str, str]
    owner: tuple[int, ...]
    page: tuple[int, ...]


def split(tasks: Sequence[Any], objects: dict[str, str]) -> tuple[list[Any], Pages]:
    """Return one task per page of every task (a task without a page list stays whole) and the split."""
    keys = set(objects.values())
    out: list[Any] = []
    owner: list[int] = []
    page: list[int] = []
    for i, task in enumerate(tasks):
        data = task.get("data") if isinstance(task, Mapping) else None
        lists = {k: data[k] for k in keys if isinstance(data, Mapping) and isinstance(data.get(k), list)}
        count = max((len(v) for v in lists.values()), default=0)
        if not isinstance(data, Mapping) or count == 0:
            out.append(task)
            owner.append(i)
            page.append(-1)
            continue
        assert isinstance(data, Mapping)  # lists is empty otherwise
        for k in range(count):
            one = {key: pages[min(k, len(pages) - 1)] for key, pages in lists.items()}
            out.append({**task, "data": {**data, **one}})
            owner.append(i)
            page.append(k)
    return out, Pages(objects, tuple(owner), tuple(page))


def merge(split_call: Call, tasks: Sequence[Any], pages: Pages) -> Call:
    """Return the call of the original tasks: each task's regions of all its pages, its first failure."""
    call = Call(tasks, split_call.context, split_call.deadline, split_call.timeout_s)
    call.lane, call.expired = split_call.lane, split_call.expired
    for j, (i, k) in enumerate(zip(pages.owner, pages.page, strict=True)):
        for region in split_call.results[j]:
            on_page = region.get("to_name") in pages.objects
            if k < 0:
                call.results[i].append(region)
            elif on_page:
                call.results[i].append({**region, "item_index": k})
            elif k == 0:
                call.results[i].append(region)
        if j in split_call.reasons:
            call.reasons.setdefault(i, split_call.reasons[j])
        if j in split_call.prompt_needed:
            call.prompt_needed.add(i)
    return call
