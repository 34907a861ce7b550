/* err.c: texts and names of the result codes, from the table in comm.h. */
#include "err.h"

COMM_API const char *comm_strerror(comm_result_t rc)
{
	switch (rc) {
#define X_TEXT(name, value, text) case name: return text;
	COMM_RESULT_LIST(X_TEXT)
#undef X_TEXT
	}
	return "unknown error";
}

COMM_API const char *comm_result_name(comm_result_t rc)
{
	switch (rc) {
#define X_NAME(name, value, text) case name: return #name;
	COMM_RESULT_LIST(X_NAME)
#undef X_NAME
	}
	return "COMM_ERR_UNKNOWN";
}

int err_known(int rc)
{
	switch (rc) {
#define X_KNOWN(name, value, text) case name: return 1;
	COMM_RESULT_LIST(X_KNOWN)
#undef X_KNOWN
	}
	return 0;
}
