/*
 * crc32c.c: CRC-32C (see crc32c.h): the SSE4.2 crc32 instruction where the
 * CPU has it, else slicing-by-8 tables.
 *
 * Reflected polynomial 0x82F63B78, initial value and final xor 0xFFFFFFFF, so
 * the check value of "123456789" is 0xE3069283 (RFC 3720, iSCSI). The crc32
 * instruction computes exactly this polynomial on the reflected register, so
 * both paths give the same results (tests/check_store.c compares them).
 */
#include "config.h"

#include "store/crc32c.h"

#include <pthread.h>
#include <stdbool.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CRC32C_HAVE_SSE42 1
#include <nmmintrin.h>
#endif

static uint32_t crc32c_table[8][256];
static bool crc32c_hw;
static pthread_once_t crc32c_once = PTHREAD_ONCE_INIT;

static void crc32c_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        crc32c_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = crc32c_table[0][i];
        for (int t = 1; t < 8; t++) {
            c = crc32c_table[0][c & 0xff] ^ (c >> 8);
            crc32c_table[t][i] = c;
        }
    }
#ifdef CRC32C_HAVE_SSE42
    __builtin_cpu_init();
    crc32c_hw = __builtin_cpu_supports("sse4.2");
#endif
}

/* The table path on the inverted register. */
static uint32_t crc32c_sw_raw(uint32_t crc, const uint8_t *b, size_t n)
{
    while (n >= 8) {
        /* Little-endian assembly of the word keeps the code byte-order neutral. */
        uint32_t lo = crc ^ ((uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 |
                             (uint32_t)b[3] << 24);
        uint32_t hi =
                (uint32_t)b[4] | (uint32_t)b[5] << 8 | (uint32_t)b[6] << 16 | (uint32_t)b[7] << 24;
        crc = crc32c_table[7][lo & 0xff] ^ crc32c_table[6][(lo >> 8) & 0xff] ^
              crc32c_table[5][(lo >> 16) & 0xff] ^ crc32c_table[4][lo >> 24] ^
              crc32c_table[3][hi & 0xff] ^ crc32c_table[2][(hi >> 8) & 0xff] ^
              crc32c_table[1][(hi >> 16) & 0xff] ^ crc32c_table[0][hi >> 24];
        b += 8;
        n -= 8;
    }
    while (n--)
        crc = crc32c_table[0][(crc ^ *b++) & 0xff] ^ (crc >> 8);
    return crc;
}

#ifdef CRC32C_HAVE_SSE42
/* The crc32 instruction, 8 bytes at a time (x86 is little-endian, and
 * memcpy keeps unaligned loads defined). About 10x the tables' speed. */
__attribute__((target("sse4.2"))) static uint32_t crc32c_hw_raw(uint32_t crc, const uint8_t *b,
                                                                size_t n)
{
    uint64_t c = crc;
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, b, sizeof(w));
        c = _mm_crc32_u64(c, w);
        b += 8;
        n -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (n--)
        c32 = _mm_crc32_u8(c32, *b++);
    return c32;
}
#endif

uint32_t pb_crc32c(uint32_t crc, const void *p, size_t n)
{
    pthread_once(&crc32c_once, crc32c_init);
#ifdef CRC32C_HAVE_SSE42
    if (crc32c_hw)
        return ~crc32c_hw_raw(~crc, p, n);
#endif
    return ~crc32c_sw_raw(~crc, p, n);
}

uint32_t pb_crc32c_sw(uint32_t crc, const void *p, size_t n)
{
    pthread_once(&crc32c_once, crc32c_init);
    return ~crc32c_sw_raw(~crc, p, n);
}
