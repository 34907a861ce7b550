/* ctl.h: what commctl's sub-commands share: a connection to commd as admin. */
#ifndef CLIENT_CTL_H
#define CLIENT_CTL_H

#include "commd.pb-c.h"

struct ctl {
	const char *socket;
	int json;
	int fd;
	const char *reason; /* abort: --reason, "" none */
	long uid;           /* abort: --uid, -1 none */
};

/* Connect and say hello as admin; prints the error and returns -1 on failure. */
int ctl_connect(struct ctl *ctl);
/* Send a request and read its reply (NULL on error, printed). */
Commpb__Envelope *ctl_call(struct ctl *ctl, Commpb__Envelope *env);
/* Print a JSON string literal. */
void ctl_json_str(const char *s);

int ctl_status(struct ctl *ctl, int argc, char **argv);
int ctl_jobs(struct ctl *ctl, int argc, char **argv);
int ctl_topo(struct ctl *ctl, int argc, char **argv);
int ctl_abort(struct ctl *ctl, int argc, char **argv);

#endif
