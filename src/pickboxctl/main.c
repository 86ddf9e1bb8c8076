/*
 * main.c: pickboxctl's entry point; everything else is in the files that
 * the unit tests link too (cli.c, client.c, render.c, commands.c).
 */
#include "config.h"

#include <stdlib.h>

#include "pickboxctl/pickboxctl.h"

int main(int argc, char **argv)
{
    struct pbctl_env env = {
            .out = stdout,
            .err = stderr,
            .run_dir = NULL,
            .env_socket = getenv("PICKBOX_SOCKET"),
    };
    return pbctl_run(argc, argv, &env);
}
