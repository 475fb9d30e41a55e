/*
 * The text of QEMU's scripts/simpletrace.py (7.2 and 10.0), written from a simpletrace v4 file.
 *
 * Loaded with ctypes by qemu_ext/trace/native.py, which compiles it once with the system's C
 * compiler; without a compiler virtopt uses the numpy renderer (qemu_ext/trace/decode.py), which
 * prints the same bytes. The file format is QEMU's trace/simple.c (see qemu_ext/trace/simple.py
 * for its construct description); every length read from the file is checked against the file
 * before anything is read through it.
 *
 * Three passes over the memory-mapped file:
 *   vt_scan    records' structure (mapping and event records, truncated tail), the mapping
 *              records' offsets, the event ids in use, the deltas Python must format itself;
 *   vt_check   every event record's arguments against its declaration (integers, strings);
 *   vt_render  the lines, into a buffer the caller writes out, window by window.
 */
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/types.h>

#define RECORD_TYPE_MAPPING 0
#define RECORD_TYPE_EVENT 1
#define DROPPED_EVENT_ID 0xfffffffffffffffeULL
#define NIDS 65536 /* event ids 0..NIDS-1 are kept in tables; slot NIDS is the dropped record */
#define MAX_NAME 4096
#define EXACT_DELTA (1000ULL << 42) /* below: '%0.3f' % (d / 1000.0) is the integer rendering of d */

enum {
    VT_OK = 0,
    VT_ERR_MAPPING_LEN = 1,  /* mapping record names an event of err_val bytes */
    VT_ERR_MAPPING_NAME = 2, /* mapping record's name is not an identifier */
    VT_ERR_EVENT_LEN = 3,    /* event record's length field err_val < 24 */
    VT_ERR_RECORD_TYPE = 4,  /* record type err_val is neither 0 nor 1 */
    VT_UNSUPPORTED = 5,      /* an event id >= NIDS, or too many slow deltas: use the numpy path */
};

struct vt_scan_out {
    uint64_t end;       /* where the last complete record ends */
    uint64_t truncated; /* 1: the bytes from end on are not a complete record */
    uint64_t n_events;
    uint64_t n_map;     /* mapping records (offsets stored up to map_cap) */
    uint64_t n_ids;     /* distinct event ids in use */
    uint64_t n_slow;    /* deltas Python formats (stored up to slow_cap) */
    uint64_t err, err_off, err_val;
    uint64_t map_bytes; /* what vt_names packs: 12 bytes plus the name per mapping record */
};

struct vt_prog { /* one event: "NAME " then its arguments */
    uint32_t name_off, name_len, nargs, arg0, label_total;
    uint32_t fixed_len; /* the record length of an event without strings (24 + 8 per argument); 0: strings */
};

struct vt_arg {
    uint32_t is_str, label_off, label_len; /* label: " name=0x" (integers) or " name=" (strings) */
};

struct vt_state {
    uint64_t pos, end, prev_ts, index, slow_i, started, need;
};

static inline uint64_t ld64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline uint32_t ld32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

void *vt_map(int fd, uint64_t size)
{
    void *p = mmap(NULL, size, PROT_READ, MAP_PRIVATE | MAP_POPULATE, fd, 0);
    return p == MAP_FAILED ? NULL : p;
}

void vt_unmap(void *p, uint64_t size) { munmap(p, size); }

static int is_ident(const uint8_t *s, uint32_t n)
{
    if (n == 0 || !((s[0] >= 'A' && s[0] <= 'Z') || (s[0] >= 'a' && s[0] <= 'z') || s[0] == '_'))
        return 0;
    for (uint32_t i = 1; i < n; i++) {
        uint8_t c = s[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_'))
            return 0;
    }
    return 1;
}

int vt_scan(const uint8_t *d, uint64_t size, uint64_t start, struct vt_scan_out *o,
            uint64_t *map_off, uint64_t map_cap, uint64_t *first_off, uint64_t *ids,
            uint64_t *slow, uint64_t slow_cap)
{
    uint64_t pos = start, prev = 0;
    int started = 0;
    memset(o, 0, sizeof(*o));
    while (pos < size) {
        uint64_t rem = size - pos;
        if (rem < 8)
            break;
        uint64_t type = ld64(d + pos);
        if (type == RECORD_TYPE_MAPPING) {
            if (rem < 20)
                break;
            uint32_t len = ld32(d + pos + 16);
            if (len > MAX_NAME) {
                o->err = VT_ERR_MAPPING_LEN; o->err_off = pos; o->err_val = len;
                return 1;
            }
            if (len > rem - 20)
                break;
            if (!is_ident(d + pos + 20, len)) {
                o->err = VT_ERR_MAPPING_NAME; o->err_off = pos;
                return 1;
            }
            if (o->n_map < map_cap)
                map_off[o->n_map] = pos;
            o->n_map++;
            o->map_bytes += 12 + (uint64_t)len;
            pos += 20 + (uint64_t)len;
        } else if (type == RECORD_TYPE_EVENT) {
            if (rem < 32)
                break;
            uint64_t id = ld64(d + pos + 8), ts = ld64(d + pos + 16);
            uint32_t len = ld32(d + pos + 24);
            if (len < 24) {
                o->err = VT_ERR_EVENT_LEN; o->err_off = pos; o->err_val = len;
                return 1;
            }
            if ((uint64_t)len > rem - 8)
                break;
            uint64_t slot = id == DROPPED_EVENT_ID ? NIDS : id;
            if (id != DROPPED_EVENT_ID && id >= NIDS) {
                o->err = VT_UNSUPPORTED; o->err_off = pos; o->err_val = id;
                return 1;
            }
            if (first_off[slot] == 0) {
                first_off[slot] = pos;
                ids[o->n_ids++] = slot;
            }
            if (started && slow_cap) { /* slow_cap 0: the caller does not print (vt_index) */
                uint64_t mag = ts >= prev ? ts - prev : prev - ts;
                if (mag >= EXACT_DELTA) {
                    if (o->n_slow >= slow_cap) {
                        o->err = VT_UNSUPPORTED; o->err_off = pos; o->err_val = 0;
                        return 1;
                    }
                    slow[3 * o->n_slow] = o->n_events;
                    slow[3 * o->n_slow + 1] = ts;
                    slow[3 * o->n_slow + 2] = prev;
                    o->n_slow++;
                }
            }
            started = 1;
            prev = ts;
            o->n_events++;
            pos += 8 + (uint64_t)len;
        } else {
            o->err = VT_ERR_RECORD_TYPE; o->err_off = pos; o->err_val = type;
            return 1;
        }
    }
    o->end = pos;
    o->truncated = pos < size;
    return 0;
}

/* The mapping records at map_off (found by vt_scan) packed into out: u64 id, u32 len, name.
 * Returns the bytes written; out has room for all of them (the caller sized it from the records). */
uint64_t vt_names(const uint8_t *d, const uint64_t *map_off, uint64_t n, uint8_t *out)
{
    uint8_t *o = out;
    for (uint64_t i = 0; i < n; i++) {
        uint32_t len = ld32(d + map_off[i] + 16);
        memcpy(o, d + map_off[i] + 8, 12 + (uint64_t)len);
        o += 12 + (uint64_t)len;
    }
    return (uint64_t)(o - out);
}

/* The file offset and the four header words (type, event id, timestamp, length | pid << 32) of
 * every event record in [start, end), which vt_scan proved: the numpy decoder's index. */
void vt_index(const uint8_t *d, uint64_t start, uint64_t end, int64_t *offsets, uint64_t *hdr, uint64_t n)
{
    uint64_t pos = start, i = 0;
    while (end - pos >= 20 && i < n) {
        if (ld64(d + pos) == RECORD_TYPE_MAPPING) {
            pos += 20 + (uint64_t)ld32(d + pos + 16);
            continue;
        }
        if (end - pos < 32)
            break;
        offsets[i] = (int64_t)pos;
        memcpy(hdr + 4 * i, d + pos, 32);
        i++;
        uint32_t len = ld32(d + pos + 24);
        if (len < 24)
            break;
        pos += 8 + (uint64_t)len;
    }
}

/* Arguments of the event record at pos laid out as declared, filling its length exactly? */
static int args_fit(const uint8_t *d, uint64_t pos, const struct vt_prog *p, const struct vt_arg *args)
{
    if (p->fixed_len)
        return ld32(d + pos + 24) == p->fixed_len;
    uint64_t q = pos + 32, end = pos + 8 + (uint64_t)ld32(d + pos + 24);
    for (uint32_t i = 0; i < p->nargs; i++) {
        if (args[p->arg0 + i].is_str) {
            if (end - q < 4)
                return 0;
            uint64_t l = ld32(d + q);
            q += 4;
            if (end - q < l)
                return 0;
            q += l;
        } else {
            if (end - q < 8)
                return 0;
            q += 8;
        }
    }
    return q == end;
}

void vt_check(const uint8_t *d, uint64_t start, uint64_t end, const int32_t *prog_of,
              const struct vt_prog *progs, const struct vt_arg *args, uint64_t *bad_off)
{
    uint64_t pos = start;
    /* vt_scan proved this structure; the checks below only keep a file that changed since
     * from taking the walk out of bounds (vt_render then reports it) */
    while (end - pos >= 20) {
        if (ld64(d + pos) == RECORD_TYPE_MAPPING) {
            pos += 20 + (uint64_t)ld32(d + pos + 16);
            continue;
        }
        if (end - pos < 32)
            break;
        uint64_t id = ld64(d + pos + 8);
        uint32_t len = ld32(d + pos + 24);
        if (len < 24 || 8 + (uint64_t)len > end - pos || (id != DROPPED_EVENT_ID && id >= NIDS))
            break;
        int32_t k = prog_of[id == DROPPED_EVENT_ID ? NIDS : id];
        if (k < 0)
            break;
        if (!args_fit(d, pos, &progs[k], args) && bad_off[k] == 0)
            bad_off[k] = pos;
        pos += 8 + (uint64_t)len;
    }
}

static const char HEX[] = "0123456789abcdef";
static const char DEC2[] =
    "00010203040506070809101112131415161718192021222324252627282930313233343536373839"
    "40414243444546474849505152535455565758596061626364656667686970717273747576777879"
    "8081828384858687888990919293949596979899";

static uint16_t HEX2[256]; /* two hex digits of each byte value, first digit in the low byte */

static void init_hex2(void)
{
    for (int i = 0; i < 256; i++)
        HEX2[i] = (uint16_t)(HEX[i >> 4] | (HEX[i & 15] << 8));
}

/* '%x' of v: lowercase, no leading zeros ("0" for 0), as Python's f'{v:x}' */
static inline uint8_t *put_hex(uint8_t *o, uint64_t v)
{
    int nd = v ? (67 - __builtin_clzll(v)) >> 2 : 1;
    int i = nd;
    while (i >= 2) {
        memcpy(o + i - 2, &HEX2[v & 0xff], 2);
        v >>= 8;
        i -= 2;
    }
    if (i)
        o[0] = HEX[v & 15];
    return o + nd;
}

static inline uint8_t *put_dec(uint8_t *o, uint64_t v)
{
    uint8_t tmp[24];
    int i = 24;
    while (v >= 100) {
        unsigned r = (unsigned)(v % 100);
        v /= 100;
        tmp[--i] = DEC2[2 * r + 1];
        tmp[--i] = DEC2[2 * r];
    }
    if (v >= 10) {
        tmp[--i] = DEC2[2 * v + 1];
        tmp[--i] = DEC2[2 * v];
    } else {
        tmp[--i] = (uint8_t)('0' + v);
    }
    memcpy(o, tmp + i, 24 - i);
    return o + 24 - i;
}

/* n bytes from src, 16 at a time: src is readable and o writable 16 bytes past n (the blob is
 * padded, the line bound leaves room), so no call to memcpy for these short copies */
static inline uint8_t *put_text(uint8_t *o, const uint8_t *src, uint32_t n)
{
    uint32_t i = 0;
    do {
        memcpy(o + i, src + i, 16);
        i += 16;
    } while (i < n);
    return o + n;
}

/* CPython's bytes repr (Objects/bytesobject.c, PyBytes_Repr with smartquotes): what both
 * versions of simpletrace.py print for a string argument. */
static uint8_t *put_bytes_repr(uint8_t *o, const uint8_t *s, uint64_t n)
{
    uint8_t q = '\'';
    uint64_t plain = 0;
    while (plain < n && s[plain] >= ' ' && s[plain] < 0x7f && s[plain] != '\'' && s[plain] != '\\')
        plain++;
    if (plain == n) { /* the usual string: printable, no quote, no backslash */
        *o++ = 'b';
        *o++ = q;
        memcpy(o, s, n);
        o += n;
        *o++ = q;
        return o;
    }
    if (memchr(s, '\'', n) && !memchr(s, '"', n))
        q = '"';
    *o++ = 'b';
    *o++ = q;
    for (uint64_t i = 0; i < n; i++) {
        uint8_t c = s[i];
        if (c == q || c == '\\') {
            *o++ = '\\';
            *o++ = c;
        } else if (c == '\t') {
            *o++ = '\\'; *o++ = 't';
        } else if (c == '\n') {
            *o++ = '\\'; *o++ = 'n';
        } else if (c == '\r') {
            *o++ = '\\'; *o++ = 'r';
        } else if (c < ' ' || c >= 0x7f) {
            *o++ = '\\'; *o++ = 'x'; *o++ = HEX[c >> 4]; *o++ = HEX[c & 15];
        } else {
            *o++ = c;
        }
    }
    *o++ = q;
    return o;
}

/*
 * Lines of the records from s->pos up to s->end into out (at most cap bytes); returns the bytes
 * written. When not even one line fits, returns 0 with s->need set to the room it wants.
 * Every record was checked by vt_scan and vt_check. noargs_space: 10.0's simpletrace.py ends
 * the line of an event without arguments with a space after pid=N.
 */
uint64_t vt_render(const uint8_t *d, struct vt_state *s, const int32_t *prog_of,
                   const struct vt_prog *progs, const struct vt_arg *args, const uint8_t *blob,
                   uint32_t noargs_space, const uint64_t *slow_idx, const uint32_t *slow_txt_off,
                   const uint8_t *slow_txt, uint64_t n_slow, uint8_t *out, uint64_t cap)
{
    uint8_t *o = out, *lim = out + cap;
    uint64_t pos = s->pos;
    if (!HEX2[0])
        init_hex2();
    s->need = 0;
    while (pos < s->end) {
        if (s->end - pos < 32 && !(s->end - pos >= 20 && ld64(d + pos) == RECORD_TYPE_MAPPING)) {
            s->need = ~0ULL;
            break;
        }
        if (ld64(d + pos) == RECORD_TYPE_MAPPING) {
            uint64_t step = 20 + (uint64_t)ld32(d + pos + 16);
            if (step > s->end - pos) {
                s->need = ~0ULL;
                break;
            }
            pos += step;
            continue;
        }
        uint64_t id = ld64(d + pos + 8), ts = ld64(d + pos + 16);
        uint32_t len = ld32(d + pos + 24), pid = ld32(d + pos + 28);
        if (len < 24 || 8 + (uint64_t)len > s->end - pos || (id != DROPPED_EVENT_ID && id >= NIDS) ||
            prog_of[id == DROPPED_EVENT_ID ? NIDS : id] < 0) {
            s->need = ~0ULL; /* the file changed since vt_scan and vt_check read it */
            break;
        }
        const struct vt_prog *p = &progs[prog_of[id == DROPPED_EVENT_ID ? NIDS : id]];
        const uint8_t *rec_end = d + pos + 8 + len;
        uint64_t bound = (uint64_t)p->name_len + 96 + p->label_total + 35ULL * p->nargs + 4ULL * len;
        if ((uint64_t)(lim - o) < bound) {
            if (o == out)
                s->need = bound;
            break;
        }
        o = put_text(o, blob + p->name_off, p->name_len); /* "NAME " */
        if (s->slow_i < n_slow && slow_idx[s->slow_i] == s->index) {
            uint32_t a = slow_txt_off[s->slow_i], b = slow_txt_off[s->slow_i + 1];
            memcpy(o, slow_txt + a, b - a);
            o += b - a;
            s->slow_i++;
        } else {
            uint64_t mag = 0;
            if (s->started) {
                if (ts >= s->prev_ts) {
                    mag = ts - s->prev_ts;
                } else {
                    mag = s->prev_ts - ts;
                    *o++ = '-';
                }
            }
            o = put_dec(o, mag / 1000);
            unsigned f = (unsigned)(mag % 1000);
            *o++ = '.';
            *o++ = (uint8_t)('0' + f / 100);
            *o++ = DEC2[2 * (f % 100)];
            *o++ = DEC2[2 * (f % 100) + 1];
        }
        s->started = 1;
        s->prev_ts = ts;
        memcpy(o, " pid=", 5);
        o = put_dec(o + 5, pid);
        const uint8_t *q = d + pos + 32;
        for (uint32_t i = 0; i < p->nargs; i++) {
            const struct vt_arg *a = &args[p->arg0 + i];
            o = put_text(o, blob + a->label_off, a->label_len);
            if (a->is_str) {
                uint32_t l = (uint64_t)(rec_end - q) >= 4 ? ld32(q) : ~0U;
                if (l > (uint64_t)(rec_end - q) - 4) {
                    s->need = ~0ULL;
                    s->pos = pos;
                    return 0;
                }
                o = put_bytes_repr(o, q + 4, l);
                q += 4 + (uint64_t)l;
            } else {
                if (rec_end - q < 8) {
                    s->need = ~0ULL;
                    s->pos = pos;
                    return 0;
                }
                o = put_hex(o, ld64(q));
                q += 8;
            }
        }
        if (p->nargs == 0 && noargs_space)
            *o++ = ' ';
        *o++ = '\n';
        s->index++;
        pos += 8 + (uint64_t)len;
    }
    s->pos = pos;
    return (uint64_t)(o - out);
}
