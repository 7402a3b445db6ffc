"""A stage's backward in two passes (zero-bubble schedules): I, the gradient of the stage input, which
the previous stage waits for, and W, the weight gradients, which can wait.

The autograd graph of one micro-batch splits into the *input path*, the nodes from which the stage
input's gradient is reachable, and the rest. I runs `torch.autograd.grad(output, input)`, which
executes the input path only; inside a node such as a matmul's, autograd computes only the needed
gradient (dX, not dW), so I costs about half the backward. Nodes on the input path with an edge
leaving it toward parameters are the *frontier*: a pre-hook keeps the gradient each receives
during I. W then starts autograd from those frontier nodes with the kept gradients and the
parameters as `inputs`, so it computes dW without recomputing dX. Frontier nodes that reach the
same parameters (a weight used twice) form one group, run in one call; a pre-hook then pins each
frontier node's gradient to the kept value, so a contribution flowing from one to another is not
counted twice.

W accumulates into `.grad` like `backward()`, so post-accumulate-grad hooks (llmkern DDP's bucket
hooks) fire. Because a group is one autograd call, a data-parallel wrapper that finishes its
reduction at the end of a backward call needs the last W of a step as one call: `merged=True`
runs every group at once (the pins keep it exact; it recomputes the input path's dX once more).

When the stage input needs no gradient (token ids on the first stage), the input path is empty:
I does nothing and W is the whole backward.
"""
from __future__ import annotations

import torch
from torch.autograd.graph import GradientEdge, Node, _engine_run_backward


def run_backward(outputs, grads, *, inputs=(), accumulate: bool = True, keep_graph: bool = False):
    """`torch.autograd.backward` (accumulate=True) or `torch.autograd.grad` (False, returns the
    gradients of `inputs`) straight into the autograd engine, without the Python-side size check
    of `grads` against `outputs`: the pipeline agreed the shapes before the step, and that check's
    first call imports sympy (torch.fx.experimental.symbolic_shapes), measured at 1.0 s per process
    on a quiet machine here and 4 s under load (every rank of every run pays it). Megatron calls the
    engine directly for the same reason (its "custom_backward")."""
    return _engine_run_backward(tuple(outputs), tuple(grads), keep_graph, False, tuple(inputs),
                                allow_unreachable=True, accumulate_grad=accumulate)


def _node_of(t: torch.Tensor) -> Node | None:
    """The grad_fn of a non-leaf, the AccumulateGrad node of a leaf that requires grad."""
    if t.grad_fn is not None:
        return t.grad_fn
    if not t.requires_grad:
        return None
    return t.view_as(t).grad_fn.next_functions[0][0]


class SplitBackward:
    """The backward of one stage on one micro-batch, as `input_grad()` then `weight_grad()`.

    output:      the stage output (or the loss on the last stage)
    grad_output: its gradient (None for a scalar loss: ones)
    inputs:      the stage inputs whose gradients I returns (leaves; those not requiring grad are skipped)
    params:      the parameters W accumulates into
    """

    def __init__(self, output: torch.Tensor, grad_output: torch.Tensor | None, inputs: list[torch.Tensor],
                 params: list[torch.Tensor]):
        self.output = output
        self.grad_output = torch.ones_like(output) if grad_output is None else grad_output
        self.inputs = [x for x in inputs if x.requires_grad]
        self.params = [p for p in params if p.requires_grad]
        self.groups: list[tuple[list[Node], list[torch.Tensor]]] = []
        self.kept: dict[Node, tuple] = {}
        self._root_off_path = True
        self._analyze()

    def _analyze(self) -> None:
        root = self.output.grad_fn
        if root is None:
            return  # nothing in this stage requires grad
        children: dict[Node, list[Node]] = {}
        parents: dict[Node, list[Node]] = {}
        stack, seen = [root], {root}
        while stack:
            n = stack.pop()
            kids = [f for f, _ in n.next_functions if f is not None]
            children[n] = kids
            for f in kids:
                parents.setdefault(f, []).append(n)
                if f not in seen:
                    seen.add(f)
                    stack.append(f)
        # the input path: every node from which an input's AccumulateGrad is reachable
        input_nodes = [n for n in (_node_of(x) for x in self.inputs) if n is not None and n in seen]
        on_path: set[Node] = set(input_nodes)
        stack = list(input_nodes)
        while stack:
            for par in parents.get(stack.pop(), []):
                if par not in on_path:
                    on_path.add(par)
                    stack.append(par)
        param_of = {}
        for p in self.params:
            n = _node_of(p)
            if n in seen:
                param_of[n] = p
        below: dict[Node, frozenset] = {}

        def params_below(n: Node) -> frozenset:  # off-path nodes only: their subgraphs stay off-path
            if n in below:
                return below[n]
            todo, order, visited = [n], [], {n}
            while todo:  # iterative post-order, graphs are thousands of nodes deep
                m = todo.pop()
                order.append(m)
                for c in children.get(m, []):
                    if c not in visited and c not in below:
                        visited.add(c)
                        todo.append(c)
            for m in reversed(order):
                s = {m} if m in param_of else set()
                for c in children.get(m, []):
                    s |= below.get(c, frozenset())
                below[m] = frozenset(s)
            return below[n]

        links: list[tuple[Node, frozenset]] = []
        if root not in on_path:
            links.append((root, params_below(root)))
        else:
            for n in on_path:
                if n in input_nodes:
                    continue
                reach = frozenset().union(*[params_below(c) for c in children[n] if c not in on_path])
                if reach:
                    links.append((n, reach))
        # union frontier nodes that reach a common parameter
        owner: dict[Node, int] = {}
        groups: list[tuple[set, set]] = []
        for n, reach in links:
            hit = sorted({owner[q] for q in reach if q in owner})
            if hit:
                g = hit[0]
                for other in hit[1:]:
                    groups[g][0].update(groups[other][0])
                    groups[g][1].update(groups[other][1])
                    for q in groups[other][1]:
                        owner[q] = g
                    groups[other] = (set(), set())
            else:
                g = len(groups)
                groups.append((set(), set()))
            groups[g][0].add(n)
            groups[g][1].update(reach)
            for q in reach:
                owner[q] = g
        self.groups = [(list(f), [param_of[q] for q in qs]) for f, qs in groups if f]
        self._root_off_path = root not in on_path

    def input_grad(self) -> list[torch.Tensor | None]:
        """I: the gradients of `inputs` (None where unused); keeps what W needs."""
        if self.output.grad_fn is None or self._root_off_path:
            return [None] * len(self.inputs)

        handles = []
        for nodes, _ in self.groups:
            for n in nodes:
                handles.append(n.register_prehook(lambda g, n=n: self.kept.__setitem__(n, tuple(g))))
        try:
            grads = run_backward([self.output], [self.grad_output], inputs=self.inputs, accumulate=False,
                                 keep_graph=True)
        finally:
            for h in handles:
                h.remove()
        return list(grads)

    def weight_grad(self, merged: bool = False) -> None:
        """W: accumulates the parameters' gradients into `.grad`. merged=True runs every group in
        one autograd call (see the module docstring)."""
        if not self.groups:
            return
        if self._root_off_path:  # no input path: W is the whole backward
            run_backward([self.output], [self.grad_output], inputs=self.groups[0][1])
            self.groups = []
            self.output = self.grad_output = None
            return
        batches = [(sum((f for f, _ in self.groups), []), sum((p for _, p in self.groups), []))] if merged \
            else self.groups
        for nodes, params in batches:
            edges, grads = [], []
            for n in nodes:
                for i, g in enumerate(self.kept.get(n, ())):
                    if g is not None:
                        edges.append(GradientEdge(n, i))
                        grads.append(g)
            if not edges:
                continue
            handles = []
            if len(nodes) > 1:
                for n in nodes:
                    kept = self.kept.get(n)
                    if kept is not None:
                        handles.append(n.register_prehook(lambda g, kept=kept: kept))
            try:
                run_backward(edges, grads, inputs=params, keep_graph=True)
            finally:
                for h in handles:
                    h.remove()
        self.kept.clear()
        self.groups = []
        self.output = self.grad_output = None
