/* The routing profiles' pick (`routing.profiles.Profile.pick` after `filters.within_cap`) in one call.
 *
 * Covers the filters `healthy` and `not-overloaded`, the scorers prefix, in-flight, kv-cache, cold-spread,
 * prefix-spread, lora-affinity (a request without an adapter: every candidate scores 1), session-affinity, queue,
 * running and least-load, and the `max-score` picker (`routing.native.SPEC` names them). Every step performs the
 * same IEEE double operations in the same order as its Python twin (built with -ffp-contract=off: no fused
 * multiply-adds), so the pick, the tie-break draw and the reason are identical; tests/unit/test_routing_native.py
 * checks both paths against each other. The caller works out what needs the routing state (the prefix matches,
 * whether the request is cold, the shared-prompt counts, the session's endpoint) and passes it in.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdlib.h>
#include <string.h>

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define STR_(a) #a
#define STR(a) STR_(a)

/* codes shared with routing/native.py */
enum { F_HEALTHY = 0, F_NOT_OVERLOADED = 1 };
enum { S_PREFIX = 0, S_IN_FLIGHT, S_KV_CACHE, S_COLD_SPREAD, S_PREFIX_SPREAD, S_LORA, S_SESSION, S_QUEUE,
       S_RUNNING, S_LEAST_LOAD, S_COUNT };

#define OVERLOAD_SLACK 16.0   /* filters.OVERLOAD_SLACK */
#define LOAD_SOFTNESS 4.0     /* scorers._LOAD_SOFTNESS */
#define EPS 1e-9              /* pickers._EPS and the reason's tie margin */
#define MAX_STACK 16          /* endpoints held on the stack; larger pools allocate */

typedef struct {
    PyObject *id;             /* borrowed from the view, which the endpoints sequence holds */
    Py_ssize_t pos;           /* position in the endpoints sequence */
    int healthy, has_metrics, capped;
    double in_flight, cap, queue, running, kv, age, held;
} Ep;

static PyObject *s_only, *s_tie;

/* The fields read, in this order. A view of the type seen first (`EndpointView`, a slots dataclass) is read
 * through its slots' offsets (an attribute lookup each cost more than all the scoring of a small pool);
 * any other object through attribute lookups. */
enum { A_ID, A_HEALTHY, A_HAS_METRICS, A_MAX_CONCURRENCY, A_IN_FLIGHT, A_QUEUE, A_RUNNING, A_KV_USAGE,
       A_METRICS_AGE_S, A_HELD, A_COUNT };
static PyObject *names[A_COUNT];
static PyTypeObject *slotted;          /* the view type whose offsets are known (a strong reference) */
static PyTypeObject *tried;            /* the last type whose offsets were looked for (not dereferenced) */
static Py_ssize_t offsets[A_COUNT];

static void learn_offsets(PyTypeObject *type) {
    Py_ssize_t found[A_COUNT];
    for (int a = 0; a < A_COUNT; a++) {
        PyObject *d = PyObject_GetAttr((PyObject *)type, names[a]);
        if (d == NULL) { PyErr_Clear(); return; }
        int ok = Py_IS_TYPE(d, &PyMemberDescr_Type)
                 && ((PyMemberDescrObject *)d)->d_member->type == T_OBJECT_EX;
        if (ok) found[a] = ((PyMemberDescrObject *)d)->d_member->offset;
        Py_DECREF(d);
        if (!ok) return;
    }
    memcpy(offsets, found, sizeof(found));
    Py_INCREF(type);
    slotted = type;
}

/* a new reference to the field, or NULL with an exception */
static PyObject *field(PyObject *view, int a) {
    if (Py_TYPE(view) == slotted) {
        PyObject *v = *(PyObject **)((char *)view + offsets[a]);
        if (v != NULL) { Py_INCREF(v); return v; }
    }
    return PyObject_GetAttr(view, names[a]);
}

static int as_double(PyObject *v, double *out) {
    *out = PyFloat_CheckExact(v) ? PyFloat_AS_DOUBLE(v) : PyLong_CheckExact(v) ? PyLong_AsDouble(v)
                                                                               : PyFloat_AsDouble(v);
    Py_DECREF(v);
    return (*out == -1.0 && PyErr_Occurred()) ? -1 : 0;
}

static int read_double(PyObject *view, int a, double *out) {
    PyObject *v = field(view, a);
    return v == NULL ? -1 : as_double(v, out);
}

static int read_truth(PyObject *view, int a) {
    PyObject *v = field(view, a);
    if (v == NULL) return -1;
    int t = v == Py_True ? 1 : v == Py_False ? 0 : PyObject_IsTrue(v);
    Py_DECREF(v);
    return t;
}

static int read_view(PyObject *view, Py_ssize_t pos, Ep *e) {
    if (slotted == NULL && Py_TYPE(view) != tried) { tried = Py_TYPE(view); learn_offsets(tried); }
    e->pos = pos;
    e->id = field(view, A_ID);
    if (e->id == NULL) return -1;
    Py_DECREF(e->id);   /* the view keeps its id alive for the call */
    if ((e->healthy = read_truth(view, A_HEALTHY)) < 0) return -1;
    if ((e->has_metrics = read_truth(view, A_HAS_METRICS)) < 0) return -1;
    PyObject *cap = field(view, A_MAX_CONCURRENCY);
    if (cap == NULL) return -1;
    e->cap = 0.0;
    if ((e->capped = PyObject_IsTrue(cap)) < 0) { Py_DECREF(cap); return -1; }
    if (e->capped) { if (as_double(cap, &e->cap)) return -1; } else { Py_DECREF(cap); }
    if (read_double(view, A_IN_FLIGHT, &e->in_flight) || read_double(view, A_QUEUE, &e->queue)
        || read_double(view, A_RUNNING, &e->running) || read_double(view, A_KV_USAGE, &e->kv)
        || read_double(view, A_METRICS_AGE_S, &e->age) || read_double(view, A_HELD, &e->held)) return -1;
    return 0;
}

/* EndpointView.load */
static double load(const Ep *e) {
    double own = e->in_flight, reported = e->queue + e->running;
    return (reported > own ? reported : own) + e->held;
}

static int stale(const Ep *e, double stale_after) { return e->has_metrics && e->age > stale_after; }

static double unit(double v) { v = v > 0.0 ? v : 0.0; return v < 1.0 ? v : 1.0; }

/* builtins min / max over a list: the first value unless a later one compares less / greater */
static double min_of(const double *v, Py_ssize_t n) {
    double lo = v[0];
    for (Py_ssize_t i = 1; i < n; i++) if (v[i] < lo) lo = v[i];
    return lo;
}

static Py_ssize_t argmax_of(const double *v, Py_ssize_t n) {
    Py_ssize_t best = 0;
    for (Py_ssize_t i = 1; i < n; i++) if (v[i] > v[best]) best = i;
    return best;
}

/* scorers._min_max_low_is_good */
static void min_max_low_is_good(double *v, Py_ssize_t n) {
    double lo = v[0], hi = v[0];
    for (Py_ssize_t i = 1; i < n; i++) { if (v[i] < lo) lo = v[i]; if (v[i] > hi) hi = v[i]; }
    if (hi == lo) { for (Py_ssize_t i = 0; i < n; i++) v[i] = 1.0; return; }
    double span = hi - lo;
    for (Py_ssize_t i = 0; i < n; i++) v[i] = (hi - v[i]) / span;
}

/* ``mapping.get(id, 0)`` as a double (-1 and an exception on error) */
static int get_number(PyObject *mapping, PyObject *id, double *out) {
    PyObject *v = PyDict_GetItemWithError(mapping, id);
    if (v == NULL) { *out = 0.0; return PyErr_Occurred() ? -1 : 0; }
    *out = PyFloat_AsDouble(v);
    return (*out == -1.0 && PyErr_Occurred()) ? -1 : 0;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* scorers.cold_spread over integer stamps held as doubles (exact): 1 - rank / (distinct - 1) */
static int cold_spread(double *s, Py_ssize_t n, double *scratch) {
    memcpy(scratch, s, (size_t)n * sizeof(double));
    qsort(scratch, (size_t)n, sizeof(double), cmp_double);
    Py_ssize_t k = 0;
    for (Py_ssize_t i = 0; i < n; i++) if (k == 0 || scratch[i] != scratch[k - 1]) scratch[k++] = scratch[i];
    if (k == 1) { for (Py_ssize_t i = 0; i < n; i++) s[i] = 1.0; return 0; }
    double top = (double)(k - 1);
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t lo = 0, hi = k - 1;
        while (lo < hi) { Py_ssize_t mid = (lo + hi) / 2; if (scratch[mid] < s[i]) lo = mid + 1; else hi = mid; }
        s[i] = 1.0 - (double)lo / top;
    }
    return 0;
}

typedef struct {
    PyObject *matches;        /* dict endpoint -> matched blocks, or None */
    double total_blocks;
    int cold;
    PyObject *cold_served;    /* dict endpoint -> stamp */
    PyObject *root_counts;    /* dict endpoint -> shared prompts kept warm, or None (not sharing / not cold) */
    PyObject *session_target; /* str or None */
    double stale_after;
} Inputs;

/* The score every candidate shares (returns 1 with *same set), or 0 with the scores written to ``s``. */
static int score(int code, const Inputs *in, Ep **c, Py_ssize_t n, double *s, double *scratch, double *same) {
    Py_ssize_t i;
    switch (code) {
    case S_PREFIX:
        if (in->total_blocks == 0.0 || in->matches == Py_None || PyDict_GET_SIZE(in->matches) == 0) {
            *same = 0.0; return 1;
        }
        for (i = 0; i < n; i++) {
            if (get_number(in->matches, c[i]->id, &s[i])) return -1;
            s[i] /= in->total_blocks;
        }
        return 0;
    case S_IN_FLIGHT:
        for (i = 0; i < n; i++) s[i] = load(c[i]);
        { double lo = min_of(s, n); for (i = 0; i < n; i++) s[i] = (lo + LOAD_SOFTNESS) / (s[i] + LOAD_SOFTNESS); }
        return 0;
    case S_KV_CACHE:
        for (i = 0; i < n; i++)
            s[i] = !c[i]->has_metrics ? 1.0 : stale(c[i], in->stale_after) ? 0.0 : unit(1.0 - c[i]->kv);
        return 0;
    case S_COLD_SPREAD:
        if (!in->cold) { *same = 1.0; return 1; }
        for (i = 0; i < n; i++) if (get_number(in->cold_served, c[i]->id, &s[i])) return -1;
        return cold_spread(s, n, scratch);
    case S_PREFIX_SPREAD:
        if (!in->cold || in->root_counts == Py_None) { *same = 1.0; return 1; }
        for (i = 0; i < n; i++) if (get_number(in->root_counts, c[i]->id, &s[i])) return -1;
        min_max_low_is_good(s, n);
        return 0;
    case S_LORA:
        *same = 1.0; return 1;    /* a request with an adapter never comes here (native.py) */
    case S_SESSION:
        if (in->session_target == Py_None) { *same = 0.0; return 1; }
        for (i = 0; i < n; i++) {
            int eq = PyObject_RichCompareBool(c[i]->id, in->session_target, Py_EQ);
            if (eq < 0) return -1;
            s[i] = eq ? 1.0 : 0.0;
        }
        return 0;
    case S_QUEUE: case S_RUNNING: case S_LEAST_LOAD:
        for (i = 0; i < n; i++) s[i] = code == S_QUEUE ? c[i]->queue : code == S_RUNNING ? c[i]->running : load(c[i]);
        min_max_low_is_good(s, n);
        return 0;
    default:
        PyErr_Format(PyExc_ValueError, "unknown scorer code %d", code);
        return -1;
    }
}

/* filters.within_cap, then the profile's filters, in place over ``c``; returns how many are left */
static Py_ssize_t filter(PyObject *filters, const Inputs *in, Ep *eps, Ep **c, Py_ssize_t n, double *loads) {
    Py_ssize_t k = 0, i;
    for (i = 0; i < n; i++)
        if (eps[i].healthy && (!eps[i].capped || eps[i].in_flight < eps[i].cap)) c[k++] = &eps[i];
    if (k == 0) { for (i = 0; i < n; i++) c[i] = &eps[i]; k = n; }
    for (Py_ssize_t f = 0; f < PyTuple_GET_SIZE(filters) && k > 0; f++) {
        long code = PyLong_AsLong(PyTuple_GET_ITEM(filters, f));
        Py_ssize_t m = 0;
        if (code == F_HEALTHY) {
            for (i = 0; i < k; i++) if (c[i]->healthy) c[m++] = c[i];
        } else if (code == F_NOT_OVERLOADED) {
            Py_ssize_t fresh = 0;
            for (i = 0; i < k; i++) if (!stale(c[i], in->stale_after)) c[fresh++] = c[i];
            if (fresh == 0) fresh = k;   /* every one stale: the pointers were not moved */
            for (i = 0; i < fresh; i++) loads[i] = load(c[i]);
            double bound = 2.0 * min_of(loads, fresh) + OVERLOAD_SLACK;
            for (i = 0; i < fresh; i++) if (loads[i] <= bound) c[m++] = c[i];
        } else {
            if (code == -1 && PyErr_Occurred()) return -1;
            PyErr_Format(PyExc_ValueError, "unknown filter code %ld", code);
            return -1;
        }
        k = m;
    }
    return k;
}

/* profiles._deciding_scorer: the scorer with the largest weighted margin over the runner-up */
static PyObject *reason(PyObject *scorers, const int *listed, Py_ssize_t nlisted, double *const *parts,
                        const double *totals, Py_ssize_t n, Py_ssize_t chosen) {
    Py_ssize_t runner;
    if (n == 2) {
        runner = 1 - chosen;
    } else {
        runner = chosen == 0 ? 1 : 0;
        for (Py_ssize_t i = runner + 1; i < n; i++) if (i != chosen && totals[i] > totals[runner]) runner = i;
    }
    PyObject *best = s_tie;
    double d = totals[chosen] - totals[runner];
    if (!((d < 0.0 ? -d : d) < EPS)) {
        double margin = 0.0;
        for (Py_ssize_t k = 0; k < nlisted; k++) {
            PyObject *item = PyTuple_GET_ITEM(scorers, listed[k]);
            double w = PyFloat_AS_DOUBLE(PyTuple_GET_ITEM(item, 1));
            double m = w * (parts[k][chosen] - parts[k][runner]);
            if (m > margin) { best = PyTuple_GET_ITEM(item, 2); margin = m; }
        }
    }
    Py_INCREF(best);
    return best;
}

/* pickers.max_score: the first best, or a uniform draw among those within EPS of it */
static Py_ssize_t max_score(const double *totals, Py_ssize_t n, PyObject *randrange, Py_ssize_t *top) {
    double best = totals[argmax_of(totals, n)];
    Py_ssize_t k = 0;
    for (Py_ssize_t i = 0; i < n; i++) if (totals[i] >= best - EPS) top[k++] = i;
    if (k == 1) return top[0];
    PyObject *r = PyObject_CallFunction(randrange, "n", k);
    if (r == NULL) return -1;
    Py_ssize_t j = PyLong_AsSsize_t(r);
    Py_DECREF(r);
    if (j == -1 && PyErr_Occurred()) return -1;
    if (j < 0 || j >= k) { PyErr_SetString(PyExc_ValueError, "randrange out of range"); return -1; }
    return top[j];
}

/* Scores, totals, the pick and its reason over the ``n`` filtered candidates ``c``: (position, reason). */
static PyObject *decide(PyObject *scorers, const Inputs *in, Ep **c, Py_ssize_t n, PyObject *randrange, double *buf) {
    Py_ssize_t ns = PyTuple_GET_SIZE(scorers);
    double *totals = buf, *scratch = buf + n, *top = buf + 2 * n, *s = buf + 3 * n;
    double *parts[S_COUNT * 2];
    int listed[S_COUNT * 2];
    Py_ssize_t nlisted = 0;
    if (ns > S_COUNT * 2) { PyErr_SetString(PyExc_ValueError, "too many scorers"); return NULL; }
    for (Py_ssize_t i = 0; i < n; i++) totals[i] = 0.0;
    for (Py_ssize_t k = 0; k < ns; k++) {
        PyObject *item = PyTuple_GET_ITEM(scorers, k);
        int code = (int)PyLong_AsLong(PyTuple_GET_ITEM(item, 0));
        double w = PyFloat_AS_DOUBLE(PyTuple_GET_ITEM(item, 1)), same = 0.0;
        int uniform = score(code, in, c, n, s, scratch, &same);
        if (uniform < 0) return NULL;
        if (uniform) {
            double term = w * (same < 0.0 ? 0.0 : same > 1.0 ? 1.0 : same);
            for (Py_ssize_t i = 0; i < n; i++) totals[i] += term;
            continue;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            double v = s[i];
            totals[i] += w * (v < 0.0 ? 0.0 : v > 1.0 ? 1.0 : v);
        }
        parts[nlisted] = s;
        listed[nlisted++] = (int)k;
        s += n;
    }
    Py_ssize_t *tops = (Py_ssize_t *)top;
    Py_ssize_t chosen = max_score(totals, n, randrange, tops);
    if (chosen < 0) return NULL;
    PyObject *why = reason(scorers, listed, nlisted, parts, totals, n, chosen);
    PyObject *out = Py_BuildValue("nN", c[chosen]->pos, why);
    return out;
}

/* pick(endpoints, filters, scorers, stale_after_s, matches, total_blocks, cold, cold_served, root_counts,
 *      session_target, randrange) -> (position in endpoints, reason) | None */
static PyObject *pick(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 11) { PyErr_SetString(PyExc_TypeError, "pick takes 11 arguments"); return NULL; }
    PyObject *seq = PySequence_Fast(args[0], "endpoints must be a sequence");
    if (seq == NULL) return NULL;
    PyObject *filters = args[1], *scorers = args[2];
    if (!PyTuple_Check(filters) || !PyTuple_Check(scorers)) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_TypeError, "filters and scorers must be tuples");
        return NULL;
    }
    Inputs in = {args[4], 0.0, 0, args[7], args[8], args[9], 0.0};
    in.stale_after = PyFloat_AsDouble(args[3]);
    in.total_blocks = PyFloat_AsDouble(args[5]);
    in.cold = PyObject_IsTrue(args[6]);
    if (PyErr_Occurred() || (in.matches != Py_None && !PyDict_Check(in.matches)) || !PyDict_Check(in.cold_served)
        || (in.root_counts != Py_None && !PyDict_Check(in.root_counts))) {
        Py_DECREF(seq);
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "matches, cold_served, root_counts: dicts");
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject *out = NULL;
    Ep eps_stack[MAX_STACK], *c_stack[MAX_STACK];
    double buf_stack[MAX_STACK * (3 + S_COUNT * 2)];
    Ep *eps = eps_stack, **c = c_stack;
    double *buf = buf_stack;
    if (n > MAX_STACK) {
        eps = PyMem_Malloc((size_t)n * sizeof(Ep));
        c = PyMem_Malloc((size_t)n * sizeof(Ep *));
        buf = PyMem_Malloc((size_t)n * (3 + S_COUNT * 2) * sizeof(double));
        if (eps == NULL || c == NULL || buf == NULL) { PyErr_NoMemory(); goto done; }
    }
    PyObject **views = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; i++) if (read_view(views[i], i, &eps[i])) goto done;
    Py_ssize_t k = filter(filters, &in, eps, c, n, buf);
    if (k < 0) goto done;
    if (k == 0) { out = Py_NewRef(Py_None); goto done; }
    if (k == 1) { out = Py_BuildValue("nO", c[0]->pos, s_only); goto done; }
    out = decide(scorers, &in, c, k, args[10], buf);
done:
    if (eps != eps_stack) { PyMem_Free(eps); PyMem_Free(c); PyMem_Free(buf); }
    Py_DECREF(seq);
    return out;
}

/* ``stale[h] = stale.get(h, 0) + 1`` */
static int bump(PyObject *stale, PyObject *h) {
    PyObject *v = PyDict_GetItemWithError(stale, h);
    long n = 0;
    if (v == NULL && PyErr_Occurred()) return -1;
    if (v != NULL && (n = PyLong_AsLong(v)) == -1 && PyErr_Occurred()) return -1;
    PyObject *next = PyLong_FromLong(n + 1);
    if (next == NULL) return -1;
    int rc = PyDict_SetItem(stale, h, next);
    Py_DECREF(next);
    return rc;
}

static int call_append(PyObject *append, PyObject *h) {
    PyObject *r = PyObject_CallOneArg(append, h);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

/* The loop of `prefix.ApproxPrefixIndex.insert` over ``hashes`` for ``endpoint``, on the index's own objects:
 * insert_loop(holders, stale, append, endpoint, hashes) -> (hashes made live, some were held already). A hash
 * nobody holds gets ``endpoint`` as its sole holder; one another endpoint holds gets a holder set ({other,
 * endpoint}, built in that order); one ``endpoint`` holds counts one more stale copy. Each but the last kind is
 * appended to the LRU's order, the held ones too (their newest copy). */
static PyObject *insert_loop(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 5 || !PyDict_Check(args[0]) || !PyDict_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "insert_loop(holders: dict, stale: dict, append, endpoint, hashes)");
        return NULL;
    }
    PyObject *holders = args[0], *stale = args[1], *append = args[2], *endpoint = args[3];
    PyObject *seq = PySequence_Fast(args[4], "hashes must be a sequence");
    if (seq == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), added = 0;
    PyObject **hashes = PySequence_Fast_ITEMS(seq);
    int again = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *h = hashes[i], *s = PyDict_GetItemWithError(holders, h);
        int held;
        if (s == NULL) {
            if (PyErr_Occurred() || PyDict_SetItem(holders, h, endpoint)) goto fail;
            held = 0;
        } else if (PyUnicode_CheckExact(s)) {
            if ((held = PyObject_RichCompareBool(s, endpoint, Py_EQ)) < 0) goto fail;
            if (!held) {
                PyObject *both = PySet_New(NULL);
                if (both == NULL) goto fail;
                Py_INCREF(s);     /* the dict's reference goes with the item it replaces */
                int rc = PySet_Add(both, s) || PySet_Add(both, endpoint) || PyDict_SetItem(holders, h, both);
                Py_DECREF(s);
                Py_DECREF(both);
                if (rc) goto fail;
            }
        } else {
            if ((held = PySet_Contains(s, endpoint)) < 0) goto fail;
            if (!held && PySet_Add(s, endpoint)) goto fail;
        }
        if (held) {
            if (bump(stale, h)) goto fail;
            again = 1;
        } else {
            added++;
        }
        if (call_append(append, h)) goto fail;
    }
    Py_DECREF(seq);
    return Py_BuildValue("nO", added, again ? Py_True : Py_False);
fail:
    Py_DECREF(seq);
    return NULL;
}

/* prefix._run: ``start`` plus the consecutive blocks from ``hashes[start]`` that ``endpoint`` holds, alone or shared */
static Py_ssize_t run_of(PyObject *holders, PyObject **hashes, Py_ssize_t n, PyObject *endpoint, Py_ssize_t start) {
    Py_ssize_t k = start;
    for (; k < n; k++) {
        PyObject *s = PyDict_GetItemWithError(holders, hashes[k]);
        if (s == NULL) { if (PyErr_Occurred()) return -1; break; }
        int eq = PyObject_RichCompareBool(s, endpoint, Py_EQ);
        if (eq < 0) return -1;
        if (eq) continue;
        if (!PySet_CheckExact(s)) break;
        int in = PySet_Contains(s, endpoint);
        if (in < 0) return -1;
        if (!in) break;
    }
    return k;
}

/* ``counts[e] = value`` for every e of the set ``endpoints``, in its iteration order */
static int set_all(PyObject *counts, PyObject *endpoints, Py_ssize_t value) {
    PyObject *v = PyLong_FromSsize_t(value), *it = v ? PyObject_GetIter(endpoints) : NULL, *e;
    if (it == NULL) { Py_XDECREF(v); return -1; }
    int rc = 0;
    while (rc == 0 && (e = PyIter_Next(it)) != NULL) { rc = PyDict_SetItem(counts, e, v); Py_DECREF(e); }
    Py_DECREF(it);
    Py_DECREF(v);
    return rc || PyErr_Occurred() ? -1 : 0;
}

static int set_run(PyObject *counts, PyObject *e, Py_ssize_t value) {
    PyObject *v = value < 0 ? NULL : PyLong_FromSsize_t(value);
    if (v == NULL) return -1;
    int rc = PyDict_SetItem(counts, e, v);
    Py_DECREF(v);
    return rc;
}

/* `prefix.ApproxPrefixIndex.match` over the index's reverse map, step for step (the same set operations, the
 * same order of writes into the answer): match(holders, hashes) -> {endpoint: leading blocks it holds} */
static PyObject *match(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 2 || !PyDict_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "match(holders: dict, hashes)");
        return NULL;
    }
    PyObject *holders = args[0], *seq = PySequence_Fast(args[1], "hashes must be a sequence");
    if (seq == NULL) return NULL;
    PyObject **hashes = PySequence_Fast_ITEMS(seq), *counts = PyDict_New(), *alive = NULL, *s;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (counts == NULL) goto fail;
    s = n ? PyDict_GetItemWithError(holders, hashes[0]) : NULL;
    if (s == NULL) { if (PyErr_Occurred()) goto fail; goto done; }
    int truth = PyObject_IsTrue(s);
    if (truth < 0) goto fail;
    if (!truth) goto done;
    if (PyUnicode_CheckExact(s)) {
        if (set_run(counts, s, run_of(holders, hashes, n, s, 1))) goto fail;
        goto done;
    }
    alive = Py_NewRef(s);
    for (Py_ssize_t i = 1; i < n; i++) {
        s = PyDict_GetItemWithError(holders, hashes[i]);
        if (s == NULL && PyErr_Occurred()) goto fail;
        if (s == NULL || (truth = PyObject_IsTrue(s)) == 0) { n = i; break; }
        if (truth < 0) goto fail;
        if (PyUnicode_CheckExact(s)) {
            int in = PySequence_Contains(alive, s);
            if (in < 0) goto fail;
            if (!in) { n = i; break; }
            Py_INCREF(s);   /* held across the writes below */
            int rc = set_all(counts, alive, i) || set_run(counts, s, run_of(holders, hashes, n, s, i + 1));
            Py_DECREF(s);
            if (rc) goto fail;
            goto done;
        }
        PyObject *sub = PyObject_RichCompare(alive, s, Py_LE);
        if (sub == NULL) goto fail;
        int within = PyObject_IsTrue(sub);
        Py_DECREF(sub);
        if (within < 0) goto fail;
        if (within) continue;
        PyObject *kept = PyNumber_And(alive, s);
        if (kept == NULL) goto fail;
        int any = PyObject_IsTrue(kept);
        if (any <= 0) { Py_DECREF(kept); if (any < 0) goto fail; n = i; break; }
        PyObject *gone = PyNumber_Subtract(alive, kept);
        int rc = gone == NULL || set_all(counts, gone, i);
        Py_XDECREF(gone);
        Py_SETREF(alive, kept);
        if (rc) goto fail;
    }
    if (set_all(counts, alive, n)) goto fail;
done:
    Py_XDECREF(alive);
    Py_DECREF(seq);
    return counts;
fail:
    Py_XDECREF(alive);
    Py_XDECREF(counts);
    Py_DECREF(seq);
    return NULL;
}

static PyMethodDef methods[] = {
    {"pick", (PyCFunction)(void (*)(void))pick, METH_FASTCALL, "A profile's pick over a snapshot's endpoints."},
    {"insert_loop", (PyCFunction)(void (*)(void))insert_loop, METH_FASTCALL, "ApproxPrefixIndex.insert's loop."},
    {"match", (PyCFunction)(void (*)(void))match, METH_FASTCALL, "ApproxPrefixIndex.match."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, STR(ROUTE_MODULE), NULL, -1, methods};

PyMODINIT_FUNC CAT(PyInit_, ROUTE_MODULE)(void) {
    static const char *fields[A_COUNT] = {"id", "healthy", "has_metrics", "max_concurrency", "in_flight", "queue",
                                          "running", "kv_usage", "metrics_age_s", "held"};
    for (int a = 0; a < A_COUNT; a++)
        if ((names[a] = PyUnicode_InternFromString(fields[a])) == NULL) return NULL;
    if ((s_only = PyUnicode_InternFromString("only")) == NULL || (s_tie = PyUnicode_InternFromString("tie")) == NULL)
        return NULL;
    return PyModule_Create(&module);
}
