"""Which tokens go where: the instances a store holds, its token budget, groups of instances.

`planned_instances` is the one definition of a store's contents from its config (or the identity it recorded):
extract writes it, its preflight check reads it, and the LM view of evaluate replays it to recover the first token
of each sequence that the store drops.
"""

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import replace

from instructsae.extract.instances import TokenizedInstance, bt_blocks, fast_instances
from instructsae.schemas.extract import ExtractConfig
from instructsae.schemas.manifest import StoreIdentity


def planned_instances(plan: ExtractConfig | StoreIdentity, tokenizer, records: Iterable) -> Iterator[TokenizedInstance]:
    """The deterministic sequence of instances a store holds, from its config (or the identity it recorded) and
    the dataset's records (a DatasetReader); a resumed run replays and skips it."""
    stop = None if plan.max_instances is None else plan.skip_instances + plan.max_instances
    chosen = itertools.islice(iter(records), plan.skip_instances, stop)
    # a store from before --system-prompt, or whose template has a system role, records None: merge is the default
    system_prompt = plan.system_prompt or "merge"
    if plan.mode == "fast":
        instances = fast_instances(chosen, tokenizer, plan.max_len, system_prompt)
    else:
        instances = bt_blocks(chosen, tokenizer, plan.block_len, system_prompt)
    return within_budget(instances, plan.max_tokens, plan.keep_first_token)


def stored_length(instance: TokenizedInstance, keep_first_token: bool) -> int:
    return len(instance.token_ids) - (0 if keep_first_token else 1)


def within_budget(
    instances: Iterable[TokenizedInstance], max_tokens: int | None, keep_first_token: bool
) -> Iterator[TokenizedInstance]:
    """Stop once exactly max_tokens tokens would be stored; the last instance loses its tail.

    Cutting a tail never changes the activations before it (causal attention), so the budget is exact
    without biasing what is kept.
    """
    remaining = max_tokens
    for instance in instances:
        if stored_length(instance, keep_first_token) <= 0:
            continue
        if remaining is not None:
            keep = min(stored_length(instance, keep_first_token), remaining)
            if keep < stored_length(instance, keep_first_token):
                cut = keep + (0 if keep_first_token else 1)
                instance = replace(instance, token_ids=instance.token_ids[:cut], roles=instance.roles[:cut])
            remaining -= keep
        yield instance
        if remaining == 0:
            return


def work_units(instances: Iterable[TokenizedInstance], part_tokens: int,
               keep_first_token: bool) -> Iterator[tuple[int, list[TokenizedInstance]]]:
    """(index, instances) of consecutive runs of whole instances holding at least part_tokens stored tokens
    (the last may hold fewer): the units a multi-rank extraction shares out. They depend only on the planned
    instances and part_tokens, never on the number of ranks, so a rerun on any number of ranks finds the same
    units."""
    unit: list[TokenizedInstance] = []
    size, index = 0, 0
    for instance in instances:
        unit.append(instance)
        size += stored_length(instance, keep_first_token)
        if size >= part_tokens:
            yield index, unit
            unit, size, index = [], 0, index + 1
    if unit:
        yield index, unit


def grouped(instances: Iterable[TokenizedInstance], group_tokens: int) -> Iterator[list[TokenizedInstance]]:
    """Consecutive instances gathered until group_tokens: the unit that is computed, written and committed."""
    group: list[TokenizedInstance] = []
    size = 0
    for instance in instances:
        group.append(instance)
        size += len(instance.token_ids)
        if size >= group_tokens:
            yield group
            group, size = [], 0
    if group:
        yield group
