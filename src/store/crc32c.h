/*
 * crc32c.h: CRC-32C (Castagnoli), the checksum of every raft.db log entry and
 * snapshot payload.
 *
 * The SSE4.2 crc32 instruction where the CPU has it (checked once at run
 * time: ~10x the speed of the tables, and every byte of every log entry is
 * summed when written and when read back), else table-driven slicing-by-8
 * (about 1-2 GB/s). Nothing in it is specific to the store: it can move to
 * src/lib once a second module needs it.
 */
#ifndef PICKBOX_STORE_CRC32C_H
#define PICKBOX_STORE_CRC32C_H

#include <stddef.h>
#include <stdint.h>

/* Continues a CRC-32C over n bytes at p. Start with crc = 0; the result of one
 * call is the crc argument of the next (crc32c("ab") == crc32c(crc32c("a"), "b")).
 * Thread-safe (the tables are built once). */
uint32_t pb_crc32c(uint32_t crc, const void *p, size_t n);

/* The same, always with the tables (whatever the CPU has): for tests that
 * hold the fast path to the same results. */
uint32_t pb_crc32c_sw(uint32_t crc, const void *p, size_t n);

#endif
