/* A tiny printf: formats on the caller's stack (never in shared data: the helper uses it too) and
 * hands the VMM one line per exit. Supports %s %c %d %u %x %lu %ld %lx %%. */
#include <stdarg.h>

#include "cp_lib.h"

#define LINE_MAX 240

struct out {
    char buf[LINE_MAX];
    unsigned len;
};

static void put(struct out *o, char c)
{
    if (o->len < LINE_MAX)
        o->buf[o->len++] = c;
}

static void put_uint(struct out *o, uint64_t v, unsigned base)
{
    char tmp[24];
    int n = 0;
    do {
        unsigned d = (unsigned)(v % base);
        tmp[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
        v /= base;
    } while (v);
    while (n)
        put(o, tmp[--n]);
}

static void put_str(struct out *o, const char *s)
{
    while (*s)
        put(o, *s++);
}

static void emit(struct out *o, const char *fmt, va_list ap)
{
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            put(o, *fmt);
            continue;
        }
        int is_long = 0;
        while (*++fmt == 'l')
            is_long = 1;
        switch (*fmt) {
        case 's': put_str(o, va_arg(ap, const char *)); break;
        case 'c': put(o, (char)va_arg(ap, int)); break;
        case 'u': put_uint(o, is_long ? va_arg(ap, uint64_t) : va_arg(ap, unsigned), 10); break;
        case 'x': put_uint(o, is_long ? va_arg(ap, uint64_t) : va_arg(ap, unsigned), 16); break;
        case 'd': {
            int64_t v = is_long ? va_arg(ap, int64_t) : va_arg(ap, int);
            if (v < 0) {
                put(o, '-');
                v = -v;
            }
            put_uint(o, (uint64_t)v, 10);
            break;
        }
        case '%': put(o, '%'); break;
        default: put(o, '?'); break;
        }
        if (!*fmt)
            break;
    }
}

void cp_printf(const char *fmt, ...)
{
    struct out o;
    o.len = 0;
    va_list ap;
    va_start(ap, fmt);
    emit(&o, fmt, ap);
    va_end(ap);
    cp_mmio_store(CP_MMIO_CONSOLE, (uint64_t)(uintptr_t)o.buf | ((uint64_t)o.len << 48));
}
