"""Spreading the training examples over clients with Flower Datasets' partitioners.

Partitions, over the examples' ``category`` (a task, a user, a hospital: map the column with
``columns = {category = "..."}``):

- ``iid``: a seeded shuffle cut into equal parts (``IidPartitioner``);
- ``dirichlet``: per category, proportions drawn from Dirichlet(α) (``DirichletPartitioner``,
  redrawn up to 10 times until every client holds ``min_per_client`` examples);
- ``column``: one client per distinct category, in sorted order (``NaturalIdPartitioner``);
  ``clients`` must equal the number of categories, so none is left out;
- ``shards``: examples sorted by category, cut into ``clients × shards_per_client`` shards (the
  last ones take the remainder), each client given a seeded choice of them (``ShardPartitioner``).

Every partition is a function of the examples and the seed alone, so ``ferret run`` and the
Flower apps (both call :func:`partition`) give each client the same examples; each client's
examples keep the data's order.
"""

from __future__ import annotations

import contextlib
import functools

from .data import DataError, Example
from .sources import quiet_datasets

PARTITIONS = ("iid", "dirichlet", "column", "shards")


def partition(examples: list[Example], how: str, clients: int, seed: int, *, alpha: float = 0.5,
              min_per_client: int = 1, shards_per_client: int = 2) -> list[list[Example]]:
    """``examples`` spread over ``clients`` as ``how`` (one of :data:`PARTITIONS`) says; returns
    one list per client. Raises :class:`DataError` when a client would hold fewer than
    ``min_per_client`` examples (none, at least), or ``column`` finds another number of categories
    than clients."""
    import datasets
    from flwr_datasets import partitioner as fp

    if how not in PARTITIONS:
        raise DataError(f"unknown partition {how!r}: use one of {', '.join(PARTITIONS)}")
    if clients < 1:
        raise DataError(f"need at least one client, got {clients}")
    min_per_client = max(1, min_per_client)
    if len(examples) < clients * min_per_client:
        raise DataError(f"{len(examples)} examples cannot give {clients} clients {min_per_client} each")
    with quiet_datasets(), _quiet_natural_ids():  # the Dirichlet partitioner warns at every redraw
        labels = [ex.category for ex in examples]
        table = datasets.Dataset.from_dict({"row": list(range(len(examples))), "label": labels})
        if how == "iid":
            table = table.shuffle(seed=seed, keep_in_memory=True).flatten_indices(keep_in_memory=True)
            splitter = fp.IidPartitioner(num_partitions=clients)
        elif how == "dirichlet":
            splitter = fp.DirichletPartitioner(num_partitions=clients, partition_by="label", alpha=alpha,
                                               min_partition_size=min_per_client, seed=seed)
        elif how == "column":
            categories = len(set(table["label"]))
            if categories != clients:
                raise DataError(f"the column partition gives one client per distinct category, and the data holds "
                                f"{categories}: set clients to {categories} ({clients} would "
                                f"{'leave out' if categories > clients else 'need'} "
                                f"{abs(categories - clients)} {'categories' if categories > clients else 'more'})")
            # sorted, so partition ids (in order of first appearance) follow the sorted categories
            table = table.sort("label", keep_in_memory=True).flatten_indices(keep_in_memory=True)
            splitter = fp.NaturalIdPartitioner(partition_by="label")
        else:
            size = len(examples) // (clients * shards_per_client)
            if size < 1:
                raise DataError(f"{len(examples)} examples cannot fill {clients * shards_per_client} shards")
            splitter = fp.ShardPartitioner(num_partitions=clients, partition_by="label", shard_size=size,
                                           keep_incomplete_shard=True, seed=seed)
        splitter.dataset = table
        try:
            rows = [sorted(splitter.load_partition(c)["row"]) for c in range(clients)]
        except ValueError as err:
            raise DataError(f"no {how} partition of {len(examples)} examples over {clients} clients gives each "
                            f"{min_per_client} or more ({err}): use fewer clients, a larger alpha or a lower "
                            f"min_per_client") from None
    short = next((c for c, r in enumerate(rows) if len(r) < min_per_client), None)
    if short is not None:
        raise DataError(f"the {how} partition leaves client {short} with {len(rows[short])} examples, fewer than "
                        f"{min_per_client}: use fewer clients or another partition")
    return [[examples[i] for i in r] for r in rows]



@contextlib.contextmanager
def _quiet_natural_ids():
    """Flower Datasets' ``NaturalIdPartitioner`` draws a tqdm bar of its own, which no setting turns
    off: silenced while it runs, as ``datasets``' own bars are."""
    from flwr_datasets.partitioner import natural_id_partitioner as module

    real = getattr(module, "tqdm", None)
    if real is None:
        yield
        return
    module.tqdm = functools.partial(real, disable=True)
    try:
        yield
    finally:
        module.tqdm = real
