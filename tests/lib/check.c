/* check.c: the failure counter behind check.h. */
#include "check.h"

int check_failures;
