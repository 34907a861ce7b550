/*
 * mlp.h: the small MLP the three parallel-training demos share: fixed-seed
 * parameters, batch and targets, a blocked float32 matmul, the forward and
 * backward passes, and the reference run's tensor summaries.
 */
#ifndef MLP_H
#define MLP_H

#include <stddef.h>
#include <stdint.h>

#include "comm.h"

#define MLP_LAYERS 4
#define MLP_DIM 1024
#define MLP_BATCH 128
#define MLP_LR 1.0f

/*
 * The model: MLP_LAYERS square layers, no biases (as the reference run's
 * parameter list, four 1024x1024 tensors). Layer l's weight w[l] is
 * dim x dim row-major, in x out: y = x @ w[l]. ReLU sits between layers:
 * layer l > 0 takes relu(output of layer l-1); the last output is linear.
 */
struct mlp {
	int layers;
	int dim;
	float *w[MLP_LAYERS];
};

/* Allocate and fill the model from the fixed seed: layer l uniform in
 * [-1/sqrt(dim), 1/sqrt(dim)). 0, or -1 when out of memory. */
int mlp_init(struct mlp *m);
void mlp_free(struct mlp *m);

/* The fixed input batch (uniform in [-1, 1)) and targets (uniform in
 * [-0.2, 0.2)), both MLP_BATCH x MLP_DIM; either may be NULL. */
void mlp_batch(float *x, float *t);

/* c (m x n) = a (m x k) @ b (k x n), row-major with leading dimensions.
 * Each element sums over k in the same order whatever m and n are, so a
 * column or row slice of the product is bitwise the same as the slice of
 * the whole product. */
void mlp_matmul(int m, int n, int k, const float *a, int lda, const float *b, int ldb, float *c,
		int ldc);

/* t (cols x rows) = transpose of a (rows x cols). */
void mlp_transpose(int rows, int cols, const float *a, int lda, float *t, int ldt);

void mlp_relu(float *x, size_t n);

/*
 * Layers [first, last) of m applied to rows x dim activations x, the
 * output in y (rows x dim; may be x). Layer first > 0 takes relu(x).
 * 0, or -1 when out of memory.
 */
int mlp_forward(const struct mlp *m, int first, int last, const float *x, int rows, float *y);

/*
 * The MSE loss of the whole model on rows of x against t, and its gradient
 * with respect to every weight into grad (layers x dim x dim, layer after
 * layer). The loss is the mean over rows x dim elements. Returns the loss,
 * or a NaN when out of memory.
 */
float mlp_grad(const struct mlp *m, const float *x, const float *t, int rows, float *grad);

/* w[l] -= lr * grad[l] for every layer. */
void mlp_sgd(struct mlp *m, const float *grad, float lr);

/* max |a - b| / max |b| over n elements (max |a - b| when b is all zero). */
double mlp_rel_diff(const float *a, const float *b, size_t n);

/* FNV-1a over n bytes: equal parameters give equal hashes. */
uint64_t mlp_hash(const void *p, size_t n, uint64_t h);
#define MLP_HASH_INIT 0xcbf29ce484222325ull

/* "ROWSxCOLS[first...]", the first element with 4 decimals. */
char *mlp_summary(char *buf, size_t len, int rows, int cols, const float *v);

/* Python's list of the layers' summaries: "['1024x1024[-0.0299...]', ...]". */
char *mlp_params_str(char *buf, size_t len, const struct mlp *m);

/* v as Python's repr() prints a float: the shortest round-tripping digits. */
char *mlp_repr(char *buf, size_t len, double v);

/*
 * Join the job from the environment with stdout line-buffered (ranks print
 * concurrently); NULL, with the reason on stderr under [tag], on failure.
 */
comm_t *mlp_join(const char *tag);

#endif
