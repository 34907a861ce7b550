/*
 * log.h: daemon logging to stderr (journald adds its own timestamps under
 * systemd). The library never logs; only commd and the tools use this.
 */
#ifndef COMMON_LOG_H
#define COMMON_LOG_H

enum log_level { LVL_ERROR, LVL_WARN, LVL_INFO, LVL_DEBUG };

/* Parse "error", "warn", "info" or "debug"; -1 when unknown. */
int log_parse_level(const char *s);
void log_set_level(enum log_level level);
/*
 * Send messages to syslog (as ident) instead of stderr: for a daemonized
 * commd. Errors and warnings also go to stderr while echo_errors is set
 * (until it is ready, whoever started it still reads them).
 */
void log_use_syslog(const char *ident, int echo_errors);
int log_enabled(enum log_level level);
void log_msg(enum log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define log_error(...) log_msg(LVL_ERROR, __VA_ARGS__)
#define log_warn(...) log_msg(LVL_WARN, __VA_ARGS__)
#define log_info(...) log_msg(LVL_INFO, __VA_ARGS__)
#define log_debug(...)                                                         \
	do {                                                                   \
		if (log_enabled(LVL_DEBUG))                                    \
			log_msg(LVL_DEBUG, __VA_ARGS__);                       \
	} while (0)

#endif
