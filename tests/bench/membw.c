/*
 * membw.c: the memory bandwidth that compare.sh's "memory bound" is measured
 * against: out[i] = a[i] + b[i] + c[i] + d[i] over float32 buffers far beyond
 * the caches, 2 threads, counting 4 reads and 1 write per element.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct part {
	float *out, *a, *b, *c, *d;
	size_t lo, hi;
	pthread_barrier_t *start;
	int runs;
	double t0[64], t1[64]; /* this thread's start and end of each run */
};

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void sum4(float *restrict out, const float *restrict a, const float *restrict b,
		 const float *restrict c, const float *restrict d, size_t n)
{
	for (size_t i = 0; i < n; i++)
		out[i] = a[i] + b[i] + c[i] + d[i];
}

/* Small integers without a period, so no two pages hold the same bytes (a host
 * that merges identical pages would otherwise serve the reads from cache). */
static float val(unsigned buf, size_t i)
{
	uint64_t x = (i + 1) * 0x9e3779b97f4a7c15ull ^ (uint64_t)buf << 56;

	x ^= x >> 29;
	x *= 0xbf58476d1ce4e5b9ull;
	x ^= x >> 32;
	return (float)(x & 1023);
}

/* Each thread first-touches its own part, then runs the kernel on it each run,
 * timing itself (a timer thread would share the 2 cores and start late). */
static void *worker(void *arg)
{
	struct part *p = arg;
	size_t n = p->hi - p->lo;

	for (size_t i = p->lo; i < p->hi; i++) {
		p->a[i] = val(1, i);
		p->b[i] = val(2, i);
		p->c[i] = val(3, i);
		p->d[i] = val(4, i);
		p->out[i] = 0.0f;
	}
	for (int r = 0; r < p->runs; r++) {
		pthread_barrier_wait(p->start);
		p->t0[r] = now();
		sum4(p->out + p->lo, p->a + p->lo, p->b + p->lo, p->c + p->lo, p->d + p->lo, n);
		p->t1[r] = now();
	}
	return NULL;
}

static int cmp_double(const void *x, const void *y)
{
	double a = *(const double *)x, b = *(const double *)y;
	return (a > b) - (a < b);
}

int main(int argc, char **argv)
{
	size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 256;
	int nthreads = argc > 2 ? atoi(argv[2]) : 2, runs = argc > 3 ? atoi(argv[3]) : 7;
	size_t n = mib * 1024 * 1024 / sizeof(float);
	float *buf[5];
	pthread_t tid[64];
	struct part parts[64];
	pthread_barrier_t start;
	double gbs[64];

	if (mib == 0 || nthreads < 1 || nthreads > 64 || runs < 1 || runs > 64) {
		fprintf(stderr, "usage: membw [MIB_PER_BUFFER [THREADS [RUNS]]]\n");
		return 2;
	}
	for (int i = 0; i < 5; i++) {
		if (posix_memalign((void **)&buf[i], 4096, n * sizeof(float)) != 0) {
			fprintf(stderr, "membw: out of memory\n");
			return 1;
		}
	}
	pthread_barrier_init(&start, NULL, (unsigned)nthreads);
	for (int t = 0; t < nthreads; t++) {
		parts[t] = (struct part){ buf[0], buf[1], buf[2], buf[3], buf[4],
					  n * (size_t)t / (size_t)nthreads,
					  n * (size_t)(t + 1) / (size_t)nthreads, &start, runs, { 0 },
					  { 0 } };
		pthread_create(&tid[t], NULL, worker, &parts[t]);
	}
	for (int t = 0; t < nthreads; t++)
		pthread_join(tid[t], NULL);
	/* A run lasts from the first thread's start to the last one's end. */
	for (int r = 0; r < runs; r++) {
		double t0 = parts[0].t0[r], t1 = parts[0].t1[r];
		for (int t = 1; t < nthreads; t++) {
			t0 = parts[t].t0[r] < t0 ? parts[t].t0[r] : t0;
			t1 = parts[t].t1[r] > t1 ? parts[t].t1[r] : t1;
		}
		gbs[r] = 5.0 * (double)(n * sizeof(float)) / (t1 - t0) / 1e9;
	}
	if (buf[0][n - 1] != val(1, n - 1) + val(2, n - 1) + val(3, n - 1) + val(4, n - 1)) {
		fprintf(stderr, "membw: wrong sum\n");
		return 1;
	}
	qsort(gbs, (size_t)runs, sizeof *gbs, cmp_double);
	printf("{\"bench\":\"membw\",\"gbs\":%.3f,\"median_gbs\":%.3f,\"threads\":%d,"
	       "\"buffer_mib\":%zu,\"runs\":%d}\n",
	       gbs[runs - 1], gbs[runs / 2], nthreads, mib, runs);
	for (int i = 0; i < 5; i++)
		free(buf[i]);
	return 0;
}
