"""Page selection in the decode steps of Transformers' continuous batching (the manager's decode fast path, and decode
steps that share a forward with a prompt): every request's dense heads read the pages ``generate()`` would choose for
that request alone.

``generate()`` selects pages once the context outgrows the token budget, at its first decode step and then every
``reuse_interval`` steps, and attends the selection plus a *tail* (the newest page at the selection and every page
after it; ``page_selection.plan_step``). A request of the manager follows the same rule at its own length: where it
selects anew, its dense heads' keys are read back through the block table and ranked by the same choice
(``page_selection.quest_pages``: the bound, then the short list's exact mass); on the steps between, the selection
made for it is reused.

**What a request's selection is kept under.** The manager names the requests of each step, in the order of the
packed rows, with their lengths (``batching`` takes both from the batch it prepares, on the host), so a selection is
kept under the request's id with the length it was made at, and found again by a later step of that request whatever
its row, including after steps it was left out of. It is dropped when the manager frees the request's blocks (it
finished, was cancelled or evicted). A step whose requests are not named (a release that prepares no such batch)
selects nothing: its dense heads read every token.

This module decides; the pages are the manager's, and what it keeps (a few kilobytes per request and layer) lives
on the patched model's state (``PatchState.batched_pages``). No host read: the lengths come with the requests' ids.
A manager that captures CUDA graphs (``use_cuda_graph=True``; not the default for the package's attention) selects
nothing once it has captured one: its replays run no Python, so its dense heads read every token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..kernels.layout import BlockTableSelection, LogitTerms
from .page_selection import quest_pages


@dataclass
class _Kept:
    """A request's selection: made at ``seen`` tokens, its tail from page ``tail_first``; per layer, int32 [Hkv, S]
    pages (-1 in the streaming heads' rows)."""

    seen: int
    tail_first: int
    pages: dict = field(default_factory=dict)


@dataclass
class _Row:
    """One request of the step: its length, its tail's first page (-1: the context fits the budget, every token is
    read) and its selection (reselecting: made by this step's layers)."""

    length: int
    tail_first: int = -1
    kept: _Kept | None = None
    reselect: bool = False


@dataclass
class BatchedPages:
    """The selections kept between the decode steps of one manager on one patched model, and the plan of the current
    step."""

    kept: dict = field(default_factory=dict)  # request id -> _Kept
    rows: list = field(default_factory=list)  # this step's rows (_Row)
    tail: torch.Tensor | None = None  # int32 [R] on the device: each row's tail_first
    layer: int = -1  # the last layer seen: an index that does not grow starts a new forward
    forward: int = 0  # forwards seen (every packed call is noted, whatever path serves it)
    planned: int = -2  # the forward the rows were planned in
    graphed: bool = False  # the manager captures CUDA graphs: its replays are not seen, so nothing is selected
    selected: int = 0  # selections made (a request in a layer): what a benchmark reports
    unused: dict = field(default_factory=dict)  # (KV heads, width, device) -> int32 [Hkv, width] of -1

    def note(self, layer: int, device: torch.device) -> None:
        """Count the manager's forwards (called for every packed attention call); a call inside a CUDA-graph capture
        turns selection off for this manager (its replays run no Python: kept selections could not be told stale)."""
        if layer <= self.layer:
            self.forward += 1
        self.layer = layer
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            self.graphed = True

    def selection(self, state, layer: int, query: torch.Tensor, k_pages: torch.Tensor, block_table: torch.Tensor,
                  new_key: torch.Tensor, terms: LogitTerms, requests: list | None,
                  freed: set | None = None) -> BlockTableSelection | None:
        """The dense heads' pages of ``layer``'s step for every row (query [R, Hq, D], the step's new keys [R, Hkv,
        D], pages [num_pages, P, Hkv, D] and a block table [R, W] to read each row's keys through), or None where
        every row reads every token (no dense head here, the settings select nothing on this device, every context
        fits, a graph capture, or the rows' requests are not named). ``requests``: (id, length) of the rows in
        order (rows past them: the manager's padding); ``freed``: ids whose blocks the manager freed since the last
        step (emptied here)."""
        if self.graphed or requests is None or len(requests) > query.shape[0]:
            return None
        settings = state.settings
        dense, _, kind, _ = state.head_tables(layer, query.device)
        if not len(dense) or not _selects(settings, query.device):
            return None
        if self.planned != self.forward:
            self.planned = self.forward
            for request_id in freed or ():
                self.kept.pop(request_id, None)
            if freed:
                freed.clear()
            self._plan(settings, requests, query.device)
        if self.tail is None:
            return None
        rows, num_kv = query.shape[0], kind.shape[0]
        grouped = query.view(rows, num_kv, -1, query.shape[-1])
        due = {}  # length -> the rows of that length that select in this layer: one choice for them all
        for r, row in enumerate(self.rows):
            if row.tail_first >= 0 and (row.reselect or layer not in row.kept.pages):
                due.setdefault(row.length, []).append(r)
        for length, picked in due.items():
            index = torch.tensor(picked, device=query.device)
            chosen = self._choose(settings, grouped[index][:, dense], k_pages, block_table[index],
                                  new_key[index][:, dense], length, dense, num_kv, terms)
            for r, pages in zip(picked, chosen):
                self.rows[r].kept.pages[layer] = pages
            self.selected += len(picked)
        width = settings.token_budget // settings.page_size - 1
        unused = self.unused.get((num_kv, width, query.device))
        if unused is None:  # made once: a row that selects nothing
            unused = self.unused[(num_kv, width, query.device)] = query.new_full((num_kv, width), -1,
                                                                                 dtype=torch.int32)
        known = self.rows[:rows]  # rows past the lengths: the manager's padding, none selected
        pages = torch.stack([unused if row.tail_first < 0 else row.kept.pages[layer] for row in known]
                            + [unused] * (rows - len(known)))
        tail = self.tail[:rows]
        if len(known) < rows:
            tail = torch.cat([tail, tail.new_full((rows - len(known),), -1)])
        return BlockTableSelection(pages, tail, settings.page_size)

    def _plan(self, settings, requests: list, device) -> None:
        """Once per step (the first layer): each row's length, and whether it reuses its request's kept selection,
        selects anew or fits the budget (``requests``: (id, length) per row)."""
        page, reuse = settings.page_size, settings.reuse_interval
        self.rows = [_Row(length) for _, length in requests]
        for row, (request_id, length) in zip(self.rows, requests):
            if not _past_budget(settings, length):
                continue
            found = self.kept.get(request_id)
            if found is not None and length - reuse < found.seen < length:  # made fewer than reuse steps ago
                row.kept, row.tail_first = found, found.tail_first
                continue
            row.tail_first = -(-length // page) - 1
            row.kept, row.reselect = _Kept(length, row.tail_first), True
            self.kept[request_id] = row.kept
        self.tail = None
        if any(row.tail_first >= 0 for row in self.rows):
            self.tail = torch.tensor([row.tail_first for row in self.rows], dtype=torch.int32).to(device)

    @staticmethod
    def _choose(settings, query, k_pages, table, new_key, length: int, dense, num_kv: int,
                terms: LogitTerms) -> torch.Tensor:
        """The selection of requests of one ``length`` in one layer, as ``generate()`` makes it (query [B, Hd, G, D],
        their table rows [B, W], their new keys [B, Hd, D]): their dense heads' keys read back through the table (the
        new key last), their logical pages' min/max, then ``quest_pages``. -> int32 [B, Hkv, S]."""
        pool_page, logical = k_pages.shape[1], settings.logical_page_size
        pos = torch.arange(length - 1, device=k_pages.device)
        entries = table[:, pos // pool_page].long()[:, :, None]  # [B, n - 1, 1]
        stored = k_pages[entries, (pos % pool_page)[None, :, None], dense[None, None]]  # [B, n - 1, Hd, D]
        keys = torch.cat([stored, new_key[:, None].to(stored.dtype)], 1).transpose(1, 2)  # [B, Hd, n, D]
        blocks = keys[:, :, :(length // logical) * logical].unflatten(2, (-1, logical))
        batch = keys.shape[0]
        chosen, _ = quest_pages(query, blocks.amin(3), blocks.amax(3),
                                kv_start=torch.zeros(batch, dtype=torch.long, device=query.device), seen=length,
                                budget=settings.token_budget, page_size=settings.page_size,
                                logical_page_size=logical, shortlist=settings.shortlist, keys=keys,
                                scale=terms.scale, softcap=terms.softcap)
        pages = torch.full((batch, num_kv, chosen.shape[2]), -1, dtype=torch.int32, device=query.device)
        pages[:, dense] = chosen
        return pages


def _selects(settings, device: torch.device) -> bool:
    """Whether decode steps select pages here (``SparseConfig.page_selection``: by default on CUDA only)."""
    mode = settings.page_selection
    return mode == "always" or (mode == "auto" and device.type == "cuda")


def _past_budget(settings, length: int) -> bool:
    """Whether a context of ``length`` tokens takes more pages than the token budget holds (it selects)."""
    page = settings.page_size
    return -(-length // page) > settings.token_budget // page


def selects_past(settings, device: torch.device, longest: int) -> bool:
    """Whether a decode step whose longest request holds ``longest`` tokens may select pages for one of them."""
    return _selects(settings, device) and _past_budget(settings, longest)
