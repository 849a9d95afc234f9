# Included by _core.pyx (one compiled module, one file per concept).
"""The per-pool ordering: the best candidate of a pool in O(log n), kept up to date.

What it holds. For every slot an ordering key, ``(eff, max_concurrency,
gpu)`` with ``eff = max(in-flight, reported running)``, as of the slot's last
change; ``eff = -1`` marks a slot that is not a *candidate*: a candidate is
ready, below its max, not overloaded, and not *evicted* (found with a stale
heartbeat by an earlier decision, until its next heartbeat). Next to it the
slot's *brief*: its first leaf, and copies of what a decision checks and a
count change reads of its node and load records (services, flags, last
heartbeat, reported running, and whether it is a candidate apart from its
count). A decision then reads two lines of the chosen slot, key and brief,
and a count change the same two and the count, instead of five; keys stay
16 bytes, four to a line, because a tree repair compares other slots' keys.
For every pool a
tournament tree over its members in member order: each node keeps the slot of
a best leaf below it (keys compared exactly: ``eff_a * max_b`` against
``eff_b * max_a``, then GPU use) and how many leaves below tie with it, so the
root gives the best key and the number of candidates that share it, and
:func:`_tree_nth` finds the r-th of them, in member order, in one descent.
A tree of at most 16,384 leaves may be *flat* instead (see ``FLAT_TREE``):
two bit masks, the members in and those tied with the best, stand for its
inner nodes, as long as its changes show many ties.

Who changes it, and why that is atomic. In-flight counts change only in
``SlotCounts.c_try_add`` / ``c_add`` (every count change, the job table's
included), reported figures only in ``LoadTable.update`` (heartbeats), node
records only at publication (a new ``SnapshotKernel`` retargets the
ordering). Each of these calls, and every decision that reads or
temporarily hides leaves, runs in one compiled call that holds the GIL (or,
for a batch's placement pass, holds the scheduler's gate with the GIL
released: ``_gate.pxi``; every other entry waits for that pass) and
makes no Python-level call in the middle (no allocation either, except in
:meth:`Ordering.retarget`, which runs under the management lock, before the
kernel is published), so no other thread ever sees a half-updated tree. On a
free-threaded build the place to take a lock is those calls: one per
ordering would do, as every change is O(log n).

Lifecycle. One ordering belongs to one (SlotCounts, LoadTable) pair; a kernel
built over that pair's arrays retargets it (incrementally: records are
compared with the previous target's and only changed slots, and pools whose
member list changed, are rebuilt) and uses it while it is the ordering's
current target (``epoch``). Older kernels, kernels scoring a batch's scratch
counts, and kernels over arrays no SlotCounts owns compute the very same
decision by scanning (``SnapshotKernel._choose_scan``). Growing the counts
or the load table suspends the ordering (``ready`` false) until the next
publication rebuilds it over the new arrays.
"""

from libc.stdlib cimport calloc, realloc
from libc.string cimport memcmp

import weakref

# data address of a SlotCounts' counts -> that SlotCounts: a kernel handed the
# array (by whichever backend owns it) finds the counts whose changes it must follow
_COUNTS_BY_ADDRESS = weakref.WeakValueDictionary()

cdef double NEG_INF = float("-inf")
cdef enum:
    # a tree of this many leaves or more counts as big, i.e. cold in cache: a repair prefetches its path
    # first (_tree_set), a descent keeps its branch (_tree_nth)
    PREFETCH_TREE = 256
    # A tree of at most this many leaves can be flat: two bit masks (which members are in, which of those
    # tie with the best key) stand for its inner nodes, with counts of the best per mask word and per 16
    # words. A decision then finds the r-th best by those counts (at most 16 groups, 16 words and 8 bytes
    # of a word: small adjacent arrays, not a chain of cold lines), and a change is a bit and two counts,
    # a comparison at most; but the members are scanned again
    # when the last of the best ones gets worse or leaves. With k best of n members that is a scan of n
    # keys per k reservations: cheaper than the inner nodes' repairs (one per reservation and one per
    # release, log2 n levels each) while k is a good part of n (tied fleets: integer loads, equal
    # nodes), dearer when one node is best alone (varied loads and GPU figures). So the tree takes the
    # shape its changes speak for: flat while its scans find k >= n / FLAT_SPREAD best, of inner nodes
    # after FLAT_STREAK scans in a row find fewer, and flat again after TREE_STREAK changes in a row
    # found the root with that many ties (and at least n / TREE_STREAK_SHARE: the switch is O(n)). Either
    # shape gives the same answers; only the cost differs.
    FLAT_TREE = 16384
    FLAT_SPREAD = 8
    FLAT_STREAK = 4
    TREE_STREAK = 32
    TREE_STREAK_SHARE = 4
cdef int64_t LEAF_POS = 0xFFFFFFFF  # a leaf reference is tree id << 32 | position


cdef inline int _key_cmp(const order_key* a, const order_key* b) noexcept nogil:
    """-1, 0 or 1 as (a.eff/a.max, a.gpu) is lower than, equal to, or above b's, exactly."""
    cdef int64_t lhs = <int64_t>a.eff * <int64_t>b.max_concurrency
    cdef int64_t rhs = <int64_t>b.eff * <int64_t>a.max_concurrency
    if lhs != rhs:
        return -1 if lhs < rhs else 1
    if a.gpu != b.gpu:
        return -1 if a.gpu < b.gpu else 1
    return 0


cdef inline order_node _combine(const order_node* nodes, const order_key* keys, Py_ssize_t v) noexcept nogil:
    """Node ``v``'s answer from its two children: the better one's best, or both when they tie.

    Returned by value (it fits in registers), so the climb can compare it with
    the stored node before writing anything.
    """
    cdef const order_node* a = &nodes[2 * v]
    cdef const order_node* b = a + 1
    cdef order_node n
    cdef int c
    if b.win < 0:
        c = -1
    elif a.win < 0:
        c = 1
    else:
        c = _key_cmp(&keys[a.win], &keys[b.win])
    if c < 0:
        n.win = a.win
        n.ties = a.ties
        n.left = a.ties
    elif c > 0:
        n.win = b.win
        n.ties = b.ties
        n.left = 0
    else:
        n.win = a.win
        n.ties = a.ties + b.ties
        n.left = a.ties
    return n


cdef inline Py_ssize_t _groups(Py_ssize_t words) noexcept nogil:
    """The groups of 16 mask words of a flat tree of ``words`` words, whose best counts follow the words'
    (pool_tree.counts)."""
    return (words + 15) >> 4


cdef inline bint _few_best(const pool_tree* t) noexcept nogil:
    """The root's ties are too few a part of the members for the flat shape's scans (FLAT_SPREAD)."""
    return t.nodes[1].ties * FLAT_SPREAD < t.n


cdef inline void _count(pool_tree* t, Py_ssize_t w, int d) noexcept nogil:
    """Word ``w``'s count of best members, and its group's, by ``d`` (a tree of one word keeps none: its draw
    counts the word's bits)."""
    if t.words > 1:
        t.counts[w] += d
        t.counts[t.words + (w >> 4)] += d


cdef inline void _drop_best(pool_tree* t, Py_ssize_t first) noexcept nogil:
    """No member is best any more (``first``: the first that was; none is before it)."""
    cdef uint64_t* best = t.masks + t.words
    cdef Py_ssize_t v
    for v in range(first >> 6, t.words):
        best[v] = 0
        t.counts[v] = 0
    for v in range((first >> 6) >> 4, _groups(t.words)):  # (a group's words before ``first``'s have none)
        t.counts[t.words + v] = 0


cdef void _flat_scan(pool_tree* t, const order_key* keys) noexcept nogil:
    """A flat tree's best members (mask and counts), their number, the first of them and the root, scanning
    its members in."""
    cdef uint64_t* best = t.masks + t.words
    cdef uint64_t m, bit
    cdef Py_ssize_t w, v, i, first = -1
    cdef int32_t n = 0
    cdef int c
    cdef const order_key* top = NULL
    cdef const order_key* k
    for w in range(t.words + _groups(t.words)):
        t.counts[w] = 0
    for w in range(t.words):
        best[w] = 0
    for w in range(t.words):
        m = t.masks[w]
        while m:
            bit = m & (~m + 1)
            i = (w << 6) + _ctz64(m)
            m ^= bit
            k = &keys[t.slots[i]]
            c = _key_cmp(k, top) if n else -1
            if c == 0:
                best[w] |= bit
                _count(t, w, 1)
                n += 1
            elif c < 0:
                if n:
                    _drop_best(t, first)
                best[w] = bit
                _count(t, w, 1)
                n = 1
                top = k
                first = i  # the first best in member order: ties found later come after it
    t.first = <int32_t>first
    t.nodes[1].ties = n
    t.nodes[1].win = t.slots[first] if n else -1


cdef void _tree_inner(pool_tree* t, const order_key* keys) noexcept nogil:
    """Give a flat tree its inner nodes again, from its leaves (kept up to date in both shapes)."""
    cdef Py_ssize_t v
    for v in range(t.size - 1, 0, -1):
        t.nodes[v] = _combine(t.nodes, keys, v)
    t.flat = 0
    t.streak = 0


cdef void _tree_flatten(pool_tree* t, const order_key* keys, Py_ssize_t skip) noexcept nogil:
    """Make a tree of at most FLAT_TREE leaves flat: its masks from its leaves, its root from a scan.

    Member ``skip`` (or none: -1) is left out: in the middle of its change its
    key is already the new one, while its leaf and the masks must say what was
    before, for ``_flat_set`` to put it in as the change says.
    """
    cdef Py_ssize_t i
    for i in range(t.words):
        t.masks[i] = 0
    for i in range(t.n):
        if t.nodes[t.size + i].win >= 0 and i != skip:
            t.masks[i >> 6] |= (<uint64_t>1) << (i & 63)
    _flat_scan(t, keys)
    t.flat = 1
    t.streak = 0


cdef inline void _flat_set(pool_tree* t, const order_key* keys, Py_ssize_t pos, int32_t win, int rel) noexcept nogil:
    """``_tree_set`` for a flat tree: the leaf, the masks, the counts and the root."""
    cdef Py_ssize_t w = pos >> 6, v
    cdef uint64_t bit = (<uint64_t>1) << (pos & 63), m
    cdef uint64_t* best = t.masks + t.words
    cdef bint was_in = (t.masks[w] & bit) != 0
    cdef order_node* root = &t.nodes[1]
    cdef int32_t ties = root.ties  # (read before the leaf is written: in a tree of one leaf it is the root)
    t.nodes[t.size + pos].win = win  # the leaf, which decisions read
    t.nodes[t.size + pos].ties = 1 if win >= 0 else 0
    if win < 0:
        if not was_in:
            return
        t.masks[w] ^= bit
        rel = 1
    elif not was_in:
        t.masks[w] |= bit
        rel = -1
    if rel > 0:
        # worse, or out: one best fewer, if it was one; when it was the last, the next best are found again
        if best[w] & bit:
            best[w] ^= bit
            _count(t, w, -1)
            ties -= 1
            if ties == 0:
                _flat_scan(t, keys)
                # few best for the scan's cost, FLAT_STREAK times in a row: inner nodes from here on
                if _few_best(t):
                    t.streak += 1
                    if t.streak >= FLAT_STREAK:
                        _tree_inner(t, keys)
                else:
                    t.streak = 0
                return
            if pos == t.first:  # the next best after it (every other best is)
                m = best[w] & (~(<uint64_t>0) << (pos & 63))
                while not m:
                    w += 1
                    m = best[w]
                t.first = <int32_t>((w << 6) + _ctz64(m))
                root.win = t.slots[t.first]
    elif rel < 0:
        # better, or in: best alone when it was one (its key was the best) or beats the best, one more on a tie
        if best[w] & bit or not ties:
            rel = -1
        else:
            rel = _key_cmp(&keys[win], &keys[root.win])
        if rel < 0:
            if ties:
                _drop_best(t, t.first)
            best[w] = bit
            _count(t, w, 1)
            ties = 1
            t.first = <int32_t>pos
            root.win = win
        elif rel == 0:
            best[w] |= bit
            _count(t, w, 1)
            ties += 1
            if pos < t.first:
                t.first = <int32_t>pos
                root.win = win
    root.ties = ties


cdef bint _small_set(pool_tree* t, const order_key* keys, Py_ssize_t pos, int32_t win, int rel) noexcept nogil:
    """``_tree_set`` for a tree that may be flat: True when it took the change (flat), False for the inner nodes.

    (Apart from ``_tree_set``, so that a big tree's repair is the code it was.)
    """
    if not t.flat:
        # ties at the root worth the flat shape's scans for a while (TREE_STREAK changes in a row, and at
        # least n / TREE_STREAK_SHARE, which pays for the switch's O(n)): flat from here on
        if _few_best(t):
            t.streak = 0
            return False
        t.streak += 1
        if t.streak < TREE_STREAK or t.streak * TREE_STREAK_SHARE < t.n:
            return False
        _tree_flatten(t, keys, pos)  # (this member as out: _flat_set puts it in, if it is in)
    _flat_set(t, keys, pos, win, rel)
    return True


cdef void _tree_set(pool_tree* t, const order_key* keys, Py_ssize_t pos, int32_t win, int rel) noexcept nogil:
    """Set member ``pos``'s leaf (its slot, or -1 to leave it out) and repair its path to the root.

    ``rel`` says how the leaf's key compares with its key before the change
    (-1 better, 0 the same, 1 worse, as ``_key_cmp(new, old)``); it is read
    only when the leaf was and stays in (a leaf put in counts as better, one
    left out as worse). Correct as long as at most this one leaf is out of
    date with ``keys``.

    Why the relation: each node's answer is its best key, how many leaves
    below tie with it, and how many of those are in its left half. Knowing
    how the changed child's best key moved, and what each child contributed
    to the stored answer, most levels are settled from those counts alone,
    without reading a key: a worse child whose sibling tied leaves the
    sibling's ties; a better child that was best stays best alone; a child
    whose best key is the same contributes its new tie count. Keys are read
    (``_combine``, one comparison) only where the order between the two
    children really changes: a worse child that was best alone, or a better
    one that was not best. Tied fleets (integer loads, many equal nodes) make
    most repairs of the first kind; a comparison's branch there follows the
    loads and is mispredicted about half the time. Once a level's best key
    stands (only its tie count, or its leftmost tied leaf, moved), every
    level above changes the same way, and a shorter step that reads only the
    node itself finishes the climb (a tied fleet's common case: measured,
    5 ns of a batch's job and 5 ns of its release on 32-node pools). The
    climb stops at the first node whose answer and best key both stand,
    since nothing above depends on this leaf then. (Nodes hold a slot, not a copy of its key:
    measured, copying 24-byte nodes cost more than the lookups it saves.)
    """
    cdef order_node* nodes = t.nodes
    cdef Py_ssize_t v = t.size + pos, u
    cdef int32_t w, u_win, u_ties, o_win, cu, co, cu2, co2, cl, cr, wl, wr, side
    cdef order_node nn
    cdef order_node* n
    cdef order_node* o
    if t.size <= FLAT_TREE and _small_set(t, keys, pos, win, rel):
        return
    if nodes[v].win < 0:
        if win < 0:
            return
        rel = -1
    elif win < 0:
        rel = 1
    elif rel == 0:
        return  # the same slot, a key that compares as before: no answer above changes
    if t.size >= PREFETCH_TREE:
        # A big tree's lower levels, and the keys their best leaves point to, are cold: ask for the whole
        # path's siblings and their keys first (independent loads, which overlap), then climb.
        u = v
        while u > 1:
            w = nodes[u ^ 1].win
            if w >= 0:
                _prefetch(&keys[w])
            u >>= 1
    u_win = win
    u_ties = 1 if win >= 0 else 0
    nodes[v].win = u_win
    nodes[v].ties = u_ties
    while v > 1:
        u = v
        v >>= 1
        n = &nodes[v]
        o = &nodes[u ^ 1]
        o_win = o.win
        # what the changed child (u) and its sibling (o) contributed to the stored answer's ties. The side
        # is taken by masks, not branches: which side a path takes is random, so a branch on it (gcc makes
        # one of a plain conditional here) is mispredicted half the time, at every level.
        side = -<int32_t>(u & 1)  # 0: u is the left child; -1 (all ones): the right one
        cl = n.left
        cr = n.ties - cl
        cu = cl ^ ((cl ^ cr) & side)
        co = cl ^ cr ^ cu
        if rel > 0:
            if cu == 0:
                return  # u was not best here and got worse: this answer, and all above, stand
            if co > 0:  # the sibling tied: its ties are the answer now, with the same best key
                cu2 = 0
                co2 = co
                rel = 0
            else:  # u was best alone and got worse: compare (the best key here gets worse too)
                nn = _combine(nodes, keys, v)
                n[0] = nn
                u_win = nn.win
                u_ties = nn.ties
                continue
        elif cu > 0 or co == 0:  # better, and u was best here (or nothing was): u alone is best
            cu2 = u_ties
            co2 = 0
        else:  # better, but the sibling was best: compare
            w = _key_cmp(&keys[u_win], &keys[o_win])
            if w < 0:
                cu2 = u_ties
                co2 = 0
            elif w == 0:
                cu2 = u_ties
                co2 = co
                rel = 0
            else:
                cu2 = 0
                co2 = co
                rel = 0
        # the answer from the two contributions, leftmost tied leaf first (-1: none), by the same masks
        cl = cu2 ^ ((cu2 ^ co2) & side)
        cr = cu2 ^ co2 ^ cl
        wl = u_win ^ ((u_win ^ o_win) & side)
        wr = (u_win ^ o_win ^ wl) | -<int32_t>(cr == 0)
        nn.ties = cl + cr
        nn.left = cl
        nn.win = wl ^ ((wl ^ wr) & -<int32_t>(cl == 0))
        if rel == 0 and n.win == nn.win and n.ties == nn.ties and n.left == nn.left:
            return
        n[0] = nn
        u_win = nn.win
        u_ties = nn.ties
        if rel == 0:
            break
    # From here up u's best key is the one it had (and it has ties): each node above only follows how many
    # of them u contributes, and its leftmost tied leaf, which a shorter step settles (no sibling read).
    while v > 1:
        u = v
        v >>= 1
        n = &nodes[v]
        side = -<int32_t>(u & 1)
        cl = n.left
        cu = cl ^ ((cl ^ (n.ties - cl)) & side)
        if cu == 0:
            return  # u was not best here: nothing above changes
        cr = n.ties + u_ties - cu  # the new tie count
        w = u_win & (~side | -<int32_t>(cl == 0))  # u's leftmost leaf when it is the left half, or alone
        w |= n.win & side & -<int32_t>(cl != 0)  # else the left half's, as stored
        if cr == n.ties and w == n.win:
            return  # (then the left count stands too: a left u contributes what it did)
        n.left = cl ^ ((cl ^ u_ties) & ~side)
        n.ties = cr
        n.win = w
        u_win = w
        u_ties = cr


cdef inline int32_t _leaf_at(const pool_tree* t, Py_ssize_t p, Py_ssize_t* pos) noexcept nogil:
    """Member ``p``'s slot (its leaf, which is in), with ``*pos`` set to ``p``."""
    pos[0] = p
    return t.nodes[t.size + p].win


cdef int32_t _tree_nth(const pool_tree* t, int64_t r, Py_ssize_t* pos) noexcept nogil:
    """The slot of the ``r``-th (from 0, in member order) leaf tied with the root's best; ``*pos``: its position.

    Each node knows how many of its ties lie in its left half, so the descent
    reads one node a level and compares no keys. Which way it goes is as
    random as ``r``: in a small tree (hot in cache) the step is computed
    without a branch, a mispredicted branch at every other level costing more
    than the load it waits for, and two levels at a time (a node's count and
    both its children's, loaded at once: measured, 4 ns of a 32-node pool's
    batch job); in a big one (cold) the branch stays, since its speculation
    starts the next level's load early (two levels a step measured no better there).

    A big tree's descent also stops at the first node where ``r`` is 0: the
    answer is then that node's own best (the leftmost of its tied leaves), a
    slot it holds, and ``*pos`` is -1 (the caller finds the position from
    the slot when it needs it). Each level below is one more cold line read
    after the one before, and with few ties among many leaves (varied loads
    in a big pool) the r-th is alone in its subtree well above the leaves:
    with 41 best of 10,000 members about half the levels are left out.
    """
    cdef Py_ssize_t v = 1, right, right2
    cdef const order_node* nodes = t.nodes
    cdef int64_t left, left_a, left_b
    if nodes[1].ties == t.n:
        # every member ties (an idle pool, or one whose loads just evened out): the r-th is member r, and a
        # big tree's descent would be a chain of cold loads for nothing
        return _leaf_at(t, <Py_ssize_t>r, pos)
    cdef uint64_t m, c
    cdef Py_ssize_t w = 0, b = 0
    cdef const uint16_t* group
    if t.flat:
        if t.words == 1:  # (a small pool: the r lowest best cleared, fewer steps than counting)
            m = t.masks[1]
            while r > 0:
                m &= m - 1
                r -= 1
            return _leaf_at(t, _ctz64(m), pos)
        # the group of 16 words, then the word, then the byte of the r-th best, by their counts
        group = t.counts + t.words
        while r >= group[w]:
            r -= group[w]
            w += 1
        w <<= 4
        while r >= t.counts[w]:
            r -= t.counts[w]
            w += 1
        m = t.masks[t.words + w]
        c = m - ((m >> 1) & <uint64_t>0x5555555555555555)  # the word's bits counted per byte (no popcnt
        c = (c & <uint64_t>0x3333333333333333) + ((c >> 2) & <uint64_t>0x3333333333333333)  # instruction in
        c = (c + (c >> 4)) & <uint64_t>0x0F0F0F0F0F0F0F0F  # the baseline x86-64 a wheel is built for)
        while r >= <int64_t>((c >> b) & 0xFF):
            r -= <int64_t>((c >> b) & 0xFF)
            b += 8
        m >>= b
        while r > 0:  # (clear the r lowest of the byte's)
            m &= m - 1
            r -= 1
        return _leaf_at(t, (w << 6) + b + _ctz64(m), pos)
    if t.size < PREFETCH_TREE:
        # two levels a step while the node's children are inner nodes: their counts come with its own (three
        # loads at once), which halves the chain of loads each waiting for the one before
        while 2 * v < t.size:
            left = nodes[v].left
            left_a = nodes[2 * v].left
            left_b = nodes[2 * v + 1].left
            right = r >= left
            r -= left & -(<int64_t>right)
            left = left_a ^ ((left_a ^ left_b) & -(<int64_t>right))
            right2 = r >= left
            r -= left & -(<int64_t>right2)
            v = 4 * v + 2 * right + right2
        if v < t.size:
            left = nodes[v].left
            right = r >= left
            r -= left & -(<int64_t>right)
            v = 2 * v + right
        return _leaf_at(t, v - t.size, pos)
    while r != 0:
        if r < nodes[v].left:
            v = 2 * v
        else:
            r -= nodes[v].left
            v = 2 * v + 1
    pos[0] = v - t.size if v >= t.size else -1
    return nodes[v].win


cdef inline void _prefetch_path(const pool_tree* t, Py_ssize_t pos) noexcept nogil:
    """Ask for the lines of leaf ``pos``'s path to the root in a big tree (cold), its top levels aside.

    For a leaf about to be chosen: reserving it repairs that path, and its
    lines then load while the decision waits for the chosen slot's own
    lines, instead of after them.
    """
    cdef Py_ssize_t v
    if t.size >= PREFETCH_TREE:
        v = t.size + pos
        while v >= 64:  # the top levels (63 nodes, 12 lines) stay hot
            _prefetch(&t.nodes[v & ~1])  # the node and its sibling, one line as a rule
            v >>= 1


cdef inline int32_t _eff_of(int32_t held, int32_t running, int64_t max_concurrency, bint live) noexcept nogil:
    """A key's ``eff``: max(in-flight, reported running), or -1 when the slot is not a candidate."""
    cdef int32_t eff = held if held > running else running
    return eff if live and eff < max_concurrency else -1


cdef inline int32_t _leaf_of(const order_key* keys, int32_t slot) noexcept nogil:
    return slot if keys[slot].eff >= 0 else -1


cdef void _tree_free(pool_tree* t) noexcept nogil:
    if t != NULL:
        free(t.slots)
        free(t.next)
        free(t.nodes)
        free(t)


cdef pool_tree* _tree_new(const int32_t* slots, Py_ssize_t n, const order_key* keys) noexcept nogil:
    """A tree over ``slots`` (member order), leaves from ``keys``; NULL when out of memory."""
    cdef Py_ssize_t size = 1, i, v
    while size < n:
        size <<= 1
    # A tree that can be flat has its masks and counts in the same block, right after it: a change reads
    # the tree and its masks, and in a small pool that is one line more, the next one, not one elsewhere.
    cdef Py_ssize_t words = (size + 63) >> 6 if size <= FLAT_TREE else 0  # (a bigger tree is never flat)
    cdef pool_tree* t = <pool_tree*>calloc(
        1, sizeof(pool_tree) + 2 * words * sizeof(uint64_t) + (words + _groups(words)) * sizeof(uint16_t))
    if t == NULL:
        return NULL
    t.size = <int32_t>size
    t.n = <int32_t>n
    t.slots = <int32_t*>malloc((n if n > 0 else 1) * sizeof(int32_t))
    t.next = <int64_t*>malloc((n if n > 0 else 1) * sizeof(int64_t))
    t.nodes = <order_node*>calloc(2 * size, sizeof(order_node))
    if words:
        t.words = <int32_t>words
        t.masks = <uint64_t*>(t + 1)  # (sizeof(pool_tree) is a multiple of 8)
        t.counts = <uint16_t*>(t.masks + 2 * words)
    if t.slots == NULL or t.next == NULL or t.nodes == NULL:
        _tree_free(t)
        return NULL
    for i in range(n):
        t.slots[i] = slots[i]
        t.next[i] = -1
    for i in range(size):
        t.nodes[size + i].win = _leaf_of(keys, slots[i]) if i < n else -1
        t.nodes[size + i].ties = 1 if t.nodes[size + i].win >= 0 else 0
        t.nodes[size + i].left = 0
    t.nodes[0].win = -1
    t.nodes[0].ties = 0
    t.nodes[0].left = 0
    if words:
        # flat when enough of it ties for best (as a scan keeps a flat tree flat), else inner nodes at once:
        # a varied pool would pay FLAT_STREAK scans of its members first (measured, at 10,000 nodes: 4 scans
        # and a rebuild in its first ~170 dispatches after each publication that makes the tree anew)
        _tree_flatten(t, keys, -1)
        if _few_best(t):
            _tree_inner(t, keys)
    else:
        _tree_inner(t, keys)
    return t


@cython.final
cdef class Ordering:
    """Per-pool tournament trees over the candidates, kept in step with every change.

    Built and attached by :class:`SnapshotKernel` (see the module notes in
    ``_ordering.pxi``); decisions read it, ``SlotCounts`` and ``LoadTable``
    notify it. ``horizon`` is the latest heartbeat deadline of any node it
    evicted: a decision for a time at or before it cannot trust evictions
    and scans. Python code only inspects it (tests, diagnostics).
    """

    def __cinit__(self):
        self.shared_slots = False
        self.retired = NULL
        self.n_retired = 0
        self.keys = NULL
        self.briefs = NULL
        self.briefs_mem = NULL
        self.evicted = NULL
        self.n_slots = 0
        self.trees = NULL
        self.n_trees = 0
        self.pool_tree = NULL
        self.n_pools = 0
        self.recs = NULL
        self.loads = NULL
        self.counts = NULL
        self.pool_off = NULL
        self.pool_members = NULL
        self.threshold = 0.0
        self.target = None
        self.epoch = 0
        self.ready = False
        self.horizon = NEG_INF

    def __dealloc__(self):
        cdef Py_ssize_t i
        for i in range(self.n_retired):
            free(self.retired[i])
        free(self.retired)
        for i in range(self.n_trees):
            _tree_free(self.trees[i])
        free(self.trees)
        free(self.pool_tree)
        free(self.keys)
        free(self.briefs_mem)
        free(self.evicted)

    # -- inspection (tests, diagnostics) -----------------------------------
    def evicted_slots(self) -> list:
        """Slots evicted for a stale heartbeat and not heard from since."""
        cdef _Held _held = _hold(self.gate)  # the gate (_gate.pxi): released on return
        cdef Py_ssize_t s
        return [s for s in range(self.n_slots) if self.evicted[s]]

    def best(self, Py_ssize_t pool) -> tuple:
        """``(a best candidate slot or -1, how many candidates tie with it)`` in ``pool``."""
        cdef _Held _held = _hold(self.gate)  # the gate (_gate.pxi): released on return
        cdef pool_tree* t = self._tree_checked(pool)
        return (t.nodes[1].win, t.nodes[1].ties)

    def shape(self, Py_ssize_t pool) -> str:
        """``"flat"`` or ``"tree"``: the shape ``pool``'s tree has now (see FLAT_TREE in ``_ordering.pxi``)."""
        cdef _Held _held = _hold(self.gate)  # the gate (_gate.pxi): released on return
        return "flat" if self._tree_checked(pool).flat else "tree"

    def set_shape(self, Py_ssize_t pool, str shape not None) -> None:
        """Give ``pool``'s tree this shape (tests; ``"flat"`` needs at most 16,384 members), until its changes
        speak for the other one. The same answers either way."""
        cdef _Held _held = _hold(self.gate)  # the gate (_gate.pxi): released on return
        cdef pool_tree* t = self._tree_checked(pool)
        if shape == "flat":
            if t.masks == NULL:
                raise ValueError(f"pool {pool}: {t.n} members, too many for a flat tree")
            _tree_flatten(t, self.keys, -1)
        elif shape == "tree":
            if t.flat:
                _tree_inner(t, self.keys)
            t.streak = 0
        else:
            raise ValueError(f"shape must be 'flat' or 'tree', got {shape!r}")

    cdef pool_tree* _tree_checked(self, Py_ssize_t pool) except NULL:
        """``pool``'s current tree (built on first use); ValueError when there is none. The caller holds the gate."""
        if not self.ready or pool < 0 or pool >= self.n_pools:
            raise ValueError(f"pool {pool}: the ordering has no current tree for it")
        cdef pool_tree* t = self.tree_of(pool)
        if t == NULL:
            raise MemoryError()
        return t

    def check(self) -> None:
        """Recompute every key and tree from the arrays; AssertionError on any difference (tests)."""
        cdef _Held _held = _hold(self.gate)  # the gate (_gate.pxi): released on return
        if not self.ready:
            return
        cdef Py_ssize_t s, p, v
        cdef order_key k
        cdef slot_brief b
        cdef pool_tree* t
        cdef pool_tree* fresh
        for s in range(self.n_slots):
            k = self._key_of(s, &b)  # the key and every copy in the brief (padding is zero in both)
            if (memcmp(&k, &self.keys[s], sizeof(order_key)) != 0
                    or memcmp(&b, &self.briefs[s], sizeof(slot_brief)) != 0):
                raise AssertionError(f"ordering: stale key for slot {s}")
        for p in range(self.n_pools):
            t = self.tree_of(p)
            if t == NULL:
                raise MemoryError()
            if t.n != self.pool_off[p + 1] - self.pool_off[p] or memcmp(
                    t.slots, &self.pool_members[self.pool_off[p]], t.n * sizeof(int32_t)) != 0:
                raise AssertionError(f"ordering: the tree of pool {p} has other members")
            for v in range(t.n):
                if self.leaf_in(t.slots[v], self.pool_tree[p]) != v:
                    raise AssertionError(f"ordering: slot {t.slots[v]} does not list its leaf in pool {p}")
            fresh = _tree_new(t.slots, t.n, self.keys)
            if fresh == NULL:
                raise MemoryError()
            try:
                if fresh.flat and not t.flat:  # (compared in the shape the tree has)
                    _tree_inner(fresh, self.keys)
                elif t.flat and not fresh.flat:
                    _tree_flatten(fresh, self.keys, -1)
                for v in range(1 if not t.flat else t.size, 2 * t.size):  # (a flat tree's inner nodes are stale)
                    if (fresh.nodes[v].win != t.nodes[v].win or fresh.nodes[v].ties != t.nodes[v].ties
                            or fresh.nodes[v].left != t.nodes[v].left):
                        raise AssertionError(f"ordering: the tree of pool {p} differs at node {v}: "
                                             f"{t.nodes[v]} against {fresh.nodes[v]} rebuilt")
                if fresh.nodes[1].win != t.nodes[1].win or fresh.nodes[1].ties != t.nodes[1].ties or t.flat and (
                        fresh.first != t.first
                        or memcmp(fresh.masks, t.masks, 2 * t.words * sizeof(uint64_t)) != 0
                        or memcmp(fresh.counts, t.counts, (t.words + _groups(t.words)) * sizeof(uint16_t)) != 0):
                    raise AssertionError(f"ordering: the tree of pool {p} differs at its root or masks")
            finally:
                _tree_free(fresh)

    # -- notifications (each O(log n), atomic under the GIL) -----------------
    cdef order_key _key_of(self, Py_ssize_t s, slot_brief* b) noexcept nogil:
        """Slot ``s``'s key computed from the target arrays, and its brief into ``b`` (leaf link as it stands)."""
        cdef const node_rec* rec = &self.recs[s]
        cdef const node_load* load = &self.loads[s]
        cdef double thr = self.threshold
        cdef int64_t head = self.briefs[s].head
        cdef order_key k
        memset(b, 0, sizeof(slot_brief))
        b.last_heartbeat = load.last_heartbeat
        b.service_mask = rec.service_mask
        b.head = head
        b.running = load.running
        b.flags = rec.flags
        b.live = not (rec.status != STATUS_READY or self.evicted[s]
                      or load.cpu >= thr or load.gpu >= thr or load.mem >= thr)
        k.eff = _eff_of(self.counts[s], load.running, rec.max_concurrency, b.live)
        k.max_concurrency = rec.max_concurrency
        k.gpu = load.gpu
        return k

    cdef int _key_update(self, Py_ssize_t s) noexcept nogil:
        """Recompute slot ``s``'s key and brief from the target arrays; how its leaves must move.

        0 when no tree answer can change (the key compares as it did, or the
        slot is no candidate before or after); else -1 (better) or 1 (worse),
        what :meth:`_refresh` and ``_tree_set`` take (a slot that becomes a
        candidate, or stops being one, is told apart by its leaf).
        """
        cdef order_key k = self._key_of(s, &self.briefs[s])
        cdef order_key* old = &self.keys[s]
        cdef int rel
        if memcmp(&k, old, sizeof(order_key)) == 0:
            return 0
        if k.eff >= 0 and old.eff >= 0:
            rel = _key_cmp(&k, old)
        else:
            rel = 0 if k.eff < 0 and old.eff < 0 else 1
        old[0] = k
        return rel

    cdef int _count_update(self, Py_ssize_t s) noexcept nogil:
        """``_key_update`` after a change of slot ``s``'s in-flight count only, from its key, brief and count.

        What else the key depends on is copied in the brief, kept up to date
        by every other change, so this reads no node or load record (two
        more cold lines per count change in a big fleet).
        """
        cdef order_key* k = &self.keys[s]
        cdef const slot_brief* b = &self.briefs[s]
        cdef int32_t eff = _eff_of(self.counts[s], b.running, k.max_concurrency, b.live)
        cdef int32_t was = k.eff
        if eff == was:
            return 0
        k.eff = eff
        if eff >= 0 and was >= 0:
            return 1 if eff > was else -1  # same max and GPU use: the ratio moves with eff
        return 1

    cdef void _refresh(self, Py_ssize_t s, int rel) noexcept nogil:
        """Bring every leaf of slot ``s`` in line with its key (``rel``: from ``_key_update``)."""
        cdef int64_t ref = self.briefs[s].head
        cdef pool_tree* t
        cdef Py_ssize_t pos
        while ref >= 0:
            t = self.trees[ref >> 32]
            pos = ref & LEAF_POS
            _tree_set(t, self.keys, pos, _leaf_of(self.keys, <int32_t>s), rel)
            if not self.shared_slots:
                break  # one leaf a slot (auto pools): its link, a cold line in big fleets, is not read
            ref = t.next[pos]

    cdef void _rekey(self, Py_ssize_t s) noexcept nogil:
        """``_key_update``, then ``_refresh`` when the trees must follow."""
        cdef int rel = self._key_update(s)
        if rel:
            self._refresh(s, rel)

    cdef inline void prefetch(self, Py_ssize_t slot) noexcept nogil:
        """Start loading what a change of ``slot``'s count reads (a hint: in big fleets those lines are
        cold, and this lets them load in parallel with the caller's work instead of one after another)."""
        if self.ready and 0 <= slot < self.n_slots:
            _prefetch(&self.keys[slot])
            _prefetch(&self.briefs[slot])
            _prefetch(&self.counts[slot])

    cdef void on_count(self, Py_ssize_t slot) noexcept nogil:
        cdef int rel
        if self.ready and slot < self.n_slots:
            rel = self._count_update(slot)
            if rel:
                self._refresh(slot, rel)

    cdef void on_load(self, Py_ssize_t slot) noexcept nogil:
        if slot >= self.n_slots:
            return
        self.evicted[slot] = 0  # a heartbeat: the node is heard from again
        if self.ready:
            self._rekey(slot)

    cdef void evict(self, Py_ssize_t slot, double deadline) noexcept nogil:
        if slot >= self.n_slots:
            return
        self.evicted[slot] = 1
        if deadline > self.horizon:
            self.horizon = deadline
        if self.ready:
            self._rekey(slot)

    cdef void suspend(self) noexcept nogil:
        self.ready = False

    cdef Py_ssize_t leaf_in(self, Py_ssize_t slot, int32_t tree_id) noexcept nogil:
        """Position of ``slot``'s leaf in tree ``tree_id``, or -1."""
        if slot < 0 or slot >= self.n_slots:
            return -1
        cdef int64_t ref = self.briefs[slot].head
        while ref >= 0:
            if (ref >> 32) == tree_id:
                return ref & LEAF_POS
            ref = self.trees[ref >> 32].next[ref & LEAF_POS]
        return -1

    # -- retargeting (publication, under the management lock) -----------------
    cdef int _resize(self, Py_ssize_t n) except -1:
        if n == self.n_slots and self.keys != NULL:
            return 0
        cdef Py_ssize_t s, keep = self.n_slots if self.n_slots < n else n
        cdef uint8_t** retired
        cdef order_key* keys = <order_key*>realloc(self.keys, (n if n > 0 else 1) * sizeof(order_key))
        if keys == NULL:
            raise MemoryError()
        self.keys = keys
        # briefs on 32-byte boundaries, so that none straddles two cache lines (malloc promises 16;
        # aligned_alloc is not everywhere the wheels are built)
        cdef void* briefs_mem = malloc((n if n > 0 else 1) * sizeof(slot_brief) + 31)
        if briefs_mem == NULL:
            raise MemoryError()
        cdef slot_brief* briefs = <slot_brief*>((<size_t>briefs_mem + 31) & ~(<size_t>31))
        if keep:
            memcpy(briefs, self.briefs, keep * sizeof(slot_brief))
        free(self.briefs_mem)
        self.briefs_mem = briefs_mem
        self.briefs = briefs
        # The evicted flags are read without the GIL by a scanning decision of an
        # older kernel (SnapshotKernel._choose_scan, large pools), which may run
        # while this retarget happens: the old array is retired, not freed, so
        # such a reader never touches freed memory (it sees stale flags, and its
        # kernel is an older one anyway). Sizes double, so retired arrays add up
        # to less than the live one.
        cdef uint8_t* evicted = <uint8_t*>malloc((n if n > 0 else 1) * sizeof(uint8_t))
        if evicted == NULL:
            raise MemoryError()
        if keep:
            memcpy(evicted, self.evicted, keep * sizeof(uint8_t))
        if self.evicted != NULL:
            retired = <uint8_t**>realloc(self.retired, (self.n_retired + 1) * sizeof(uint8_t*))
            if retired == NULL:
                free(evicted)
                raise MemoryError()
            self.retired = retired
            self.retired[self.n_retired] = self.evicted
            self.n_retired += 1
        self.evicted = evicted
        for s in range(keep, n):
            self.keys[s].eff = -1
            self.keys[s].max_concurrency = 0
            self.keys[s].gpu = 0.0
            memset(&self.briefs[s], 0, sizeof(slot_brief))
            self.briefs[s].head = -1
            self.evicted[s] = 0
        self.n_slots = n
        return 0

    cdef int32_t _new_tree_id(self, pool_tree* t) noexcept nogil:
        """A free tree id for ``t``; -1 when out of memory."""
        cdef Py_ssize_t i, cap
        cdef pool_tree** grown
        for i in range(self.n_trees):
            if self.trees[i] == NULL:
                self.trees[i] = t
                return <int32_t>i
        cap = 2 * self.n_trees if self.n_trees else 16
        grown = <pool_tree**>realloc(self.trees, cap * sizeof(pool_tree*))
        if grown == NULL:
            return -1
        self.trees = grown
        for i in range(self.n_trees, cap):
            self.trees[i] = NULL
        i = self.n_trees
        self.n_trees = cap
        self.trees[i] = t
        return <int32_t>i

    cdef inline pool_tree* tree_of(self, Py_ssize_t pool) noexcept nogil:
        """The tree of ``pool`` (of the current target), built now if it has none; NULL when out of memory.

        Trees are built on first use, not at publication: a burst of
        registrations into one large pool then costs one build, by the first
        decision that needs the pool, instead of one per registration. (Inline: every decision asks, and
        the build is the rare case.)
        """
        cdef int32_t tid = self.pool_tree[pool]
        if tid >= 0:
            return self.trees[tid]
        return self._tree_build(pool)

    cdef pool_tree* _tree_build(self, Py_ssize_t pool) noexcept nogil:
        cdef int32_t tid
        cdef pool_tree* t = _tree_new(&self.pool_members[self.pool_off[pool]],
                                      self.pool_off[pool + 1] - self.pool_off[pool], self.keys)
        if t == NULL:
            return NULL
        tid = self._new_tree_id(t)
        if tid < 0:
            _tree_free(t)
            return NULL
        self._link(tid)
        self.pool_tree[pool] = tid
        return t

    cdef void _link(self, int32_t tree_id) noexcept nogil:
        cdef pool_tree* t = self.trees[tree_id]
        cdef Py_ssize_t pos
        cdef int32_t s
        for pos in range(t.n):
            s = t.slots[pos]
            if self.briefs[s].head >= 0:
                self.shared_slots = True  # until a full rebuild (conservative: dropping trees keeps it)
            t.next[pos] = self.briefs[s].head
            self.briefs[s].head = (<int64_t>tree_id << 32) | pos

    cdef void _drop_tree(self, int32_t tree_id) noexcept nogil:
        """Unlink every leaf of a tree from its slot's list, then free it."""
        cdef pool_tree* t = self.trees[tree_id]
        cdef Py_ssize_t pos
        cdef int64_t ref, me, prev
        cdef int32_t s
        for pos in range(t.n):
            s = t.slots[pos]
            me = (<int64_t>tree_id << 32) | pos
            if s >= self.n_slots:
                continue
            if self.briefs[s].head == me:
                self.briefs[s].head = t.next[pos]
                continue
            prev = self.briefs[s].head
            while prev >= 0:
                ref = self.trees[prev >> 32].next[prev & LEAF_POS]
                if ref == me:
                    self.trees[prev >> 32].next[prev & LEAF_POS] = t.next[pos]
                    break
                prev = ref
        _tree_free(t)
        self.trees[tree_id] = NULL

    cdef int _match_trees(self, const int32_t* pool_off, const int32_t* members, Py_ssize_t n_pools,
                          bint reuse) except -1:
        """Give each pool its current tree when its member list is unchanged (with ``reuse``); drop the rest.

        Pools left without a tree get one on first use (:meth:`tree_of`).
        """
        cdef int32_t* ids = <int32_t*>malloc((n_pools if n_pools > 0 else 1) * sizeof(int32_t))
        cdef uint8_t* claimed = <uint8_t*>calloc(self.n_trees if self.n_trees > 0 else 1, sizeof(uint8_t))
        cdef Py_ssize_t p, i, begin, n, pos
        cdef int64_t ref
        cdef int32_t tid
        cdef pool_tree* t
        if ids == NULL or claimed == NULL:
            free(ids)
            free(claimed)
            raise MemoryError()
        for p in range(n_pools):
            ids[p] = -1
            begin = pool_off[p]
            n = pool_off[p + 1] - begin
            if not reuse or n == 0 or members[begin] >= self.n_slots:
                continue
            ref = self.briefs[members[begin]].head
            while ref >= 0:
                tid = <int32_t>(ref >> 32)
                pos = ref & LEAF_POS
                t = self.trees[tid]
                if (pos == 0 and not claimed[tid] and t.n == n
                        and memcmp(t.slots, &members[begin], n * sizeof(int32_t)) == 0):
                    ids[p] = tid
                    claimed[tid] = 1
                    break
                ref = t.next[pos]
        for i in range(self.n_trees):
            if self.trees[i] != NULL and not claimed[i]:
                self._drop_tree(<int32_t>i)
        free(claimed)
        free(self.pool_tree)
        self.pool_tree = ids
        self.n_pools = n_pools
        return 0

    cdef int retarget(self, SnapshotKernel k, const int32_t* changed, Py_ssize_t n_changed) except -1:
        """Make the trees describe kernel ``k``'s records and pools; ``k`` becomes the current target.

        Incremental when only records (and possibly some pools) changed
        since the previous target over the same load table and counts:
        changed slots are re-keyed one at a time (so each tree repair sees at
        most one out-of-date leaf), and only pools whose member list changed
        lose their tree. The changed slots are ``changed`` when the publisher
        knows them (``n_changed >= 0``: O(changes)); otherwise the records are
        compared with the previous target's (O(slots), 64 records at a time).
        Otherwise (first target, arrays grown, another threshold) everything
        is rebuilt.
        """
        cdef bint full = (not self.ready or k.loads != self.loads or <const int32_t*>k.inflight != self.counts
                          or k.threshold != self.threshold or k.n_slots < self.n_slots)
        cdef bint pools_changed = (k.pool_off != self.pool_off or k.pool_members != self.pool_members
                                   or k.n_pools != self.n_pools)
        cdef const node_rec* old_recs = self.recs
        cdef object old_target = self.target  # keeps old_recs alive, and frees nothing before the end
        cdef Py_ssize_t old_n = self.n_slots, s, s0, end, i
        self.ready = False
        self._resize(k.n_slots)
        self.recs = k.recs
        self.loads = k.loads
        self.counts = k.inflight
        self.threshold = k.threshold
        self.pool_off = k.pool_off
        self.pool_members = k.pool_members
        if full:
            for i in range(self.n_trees):
                _tree_free(self.trees[i])
                self.trees[i] = NULL
            for s in range(self.n_slots):
                self.briefs[s].head = -1
                self._key_update(s)
            self.shared_slots = False
            self._match_trees(k.pool_off, k.pool_members, k.n_pools, False)
        else:
            if pools_changed:
                self._match_trees(k.pool_off, k.pool_members, k.n_pools, True)
            for i in range(n_changed):
                s = changed[i]
                if s < old_n:
                    self._rekey(s)
            # records that changed (compared 64 at a time, the common case being "none")
            s0 = 0 if n_changed < 0 else old_n
            while s0 < old_n:
                end = s0 + 64 if s0 + 64 < old_n else old_n
                if old_recs == self.recs or memcmp(&old_recs[s0], &self.recs[s0], (end - s0) * sizeof(node_rec)) == 0:
                    s0 = end
                    continue
                for s in range(s0, end):
                    if memcmp(&old_recs[s], &self.recs[s], sizeof(node_rec)) != 0:
                        self._rekey(s)
                s0 = end
            for s in range(old_n, self.n_slots):
                self._rekey(s)
        self.target = k.refs  # keeps every array above alive
        self.epoch += 1
        self.ready = True
        return 0  # old_target is released only now: no deallocation ran while the trees were not ready
