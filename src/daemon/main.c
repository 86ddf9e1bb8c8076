/*
 * main.c: pickboxd entry point (bootstrap placeholder; the daemon module
 * replaces this with the real wiring).
 */
#include <config.h> /* autoconf; not src/daemon/config.h */

#include <stdio.h>
#include <string.h>

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "--version") == 0) {
        printf("pickboxd %s\n", PACKAGE_VERSION);
        return 0;
    }
    fprintf(stderr, "pickboxd: not wired yet\n");
    return 2;
}
