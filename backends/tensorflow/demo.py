"""TensorFlow demo: a custom-gradient linear layer (correct and with a batch-sum bug) and a Keras MLP.

Invariant: every case is built deterministically (seeded generators) and states its expected outcome: the
correct gradients pass and the seeded bug fails, so ``gradbridge demo`` succeeds only when both hold.
"""

from __future__ import annotations

from typing import List

import tensorflow as tf  # the package's __init__ has quieted TensorFlow's logging before this first import

from ..demos import DemoCase


@tf.custom_gradient
def linear(x, w, b):
    """y = x @ w + b with a hand-written gradient."""

    def grad(upstream):
        return upstream @ tf.transpose(w), tf.transpose(x) @ upstream, tf.reduce_sum(upstream, axis=0)

    return x @ w + b, grad


@tf.custom_gradient
def linear_buggy(x, w, b):
    """Seeded bug: the weight gradient uses only the first sample of the batch (a dropped sum)."""

    def grad(upstream):
        return upstream @ tf.transpose(w), tf.transpose(x[:1]) @ upstream[:1], tf.reduce_sum(upstream, axis=0)

    return x @ w + b, grad


def cases() -> List[DemoCase]:
    import keras

    generator = tf.random.Generator.from_seed(0)
    x = generator.normal((4, 3))
    w = generator.normal((3, 2))
    b = generator.normal((2,))
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dropout(0.2),
                              keras.layers.Dense(2)])
    target = tf.constant([0, 1, 1, 0])
    # the loss function keeps the model's float64 during the check (a Loss object would compute in float32)
    loss = lambda inputs: tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(target, model(inputs),
                                                                                      from_logits=True))
    return [
        DemoCase("tf.custom_gradient: linear layer", linear, (x, w, b)),
        DemoCase("tf.custom_gradient: linear layer whose weight gradient forgets the batch sum", linear_buggy,
                 (x, w, b), expect_pass=False),
        DemoCase("Keras MLP with dropout (float32 model, checked in float64), weights checked by path", loss, (x,),
                 {"params": model}),
    ]
