//! The GenAI metrics: four histograms, aggregated here and exported as an
//! OTLP `ExportMetricsServiceRequest` by a thread of their own.
//!
//! Why not the SDK's instruments: each `record` sorted, de-duplicated and
//! hashed its attribute list into a set, then looked the set up under the
//! instrument's lock; with three records a request that was ~8 500
//! instructions (callgrind, issue 26's budget for all of tracing is 5 % of a
//! request). Here a request builds its [`Series`] once, and each record is
//! one hash lookup. The series are bounded: the catalogue's model, never the
//! client's free text, and low-cardinality error types.
//!
//! Field numbers: opentelemetry-proto's `metrics/v1/metrics.proto` (stable);
//! the test decodes our bytes with `opentelemetry-proto`.

use super::lock;
use super::otlp::EncodedResource;
use super::otlp::{attribute, double, fixed64, message, packed64, string, uint};
use opentelemetry::Value;
use rustc_hash::FxHashMap;
use std::sync::Mutex;
use std::time::SystemTime;

/// One of the four instruments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Instrument {
    /// `gen_ai.client.operation.duration`
    Duration,
    /// `gen_ai.client.token.usage`
    Tokens,
    /// `gen_ai.client.operation.time_to_first_chunk`
    FirstChunk,
    /// `gen_ai.client.operation.time_per_output_chunk`
    PerChunk,
}

/// An instrument's name, unit, description and bucket boundaries.
struct Spec {
    name: &'static str,
    unit: &'static str,
    description: &'static str,
    bounds: &'static [f64],
}

const SPECS: [Spec; 4] = [
    Spec {
        name: "gen_ai.client.operation.duration",
        unit: "s",
        description: "GenAI operation duration.",
        bounds: &super::DURATION_BUCKETS,
    },
    Spec {
        name: "gen_ai.client.token.usage",
        unit: "{token}",
        description: "Number of input and output tokens used.",
        bounds: &super::TOKEN_BUCKETS,
    },
    Spec {
        name: "gen_ai.client.operation.time_to_first_chunk",
        unit: "s",
        description: "Time to receive the first chunk, measured from when the client issues the generation request to when the first chunk is received in the response stream.",
        bounds: &super::DURATION_BUCKETS,
    },
    Spec {
        name: "gen_ai.client.operation.time_per_output_chunk",
        unit: "s",
        description: "Time per output chunk, after the first chunk, of a streamed response.",
        bounds: &super::CHUNK_BUCKETS,
    },
];

/// The attributes of one series of points (the conventions' names).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Series {
    /// `gen_ai.operation.name`
    pub operation: &'static str,
    /// The provider attribute's key and value (they depend on the
    /// conventions' version).
    pub provider: Option<(&'static str, &'static str)>,
    /// `gen_ai.request.model`, the catalogue's name (left out when empty).
    pub model: String,
    /// `error.type`
    pub error: Option<String>,
    /// `gen_ai.token.type` (the token histogram's points only)
    pub token_type: Option<&'static str>,
}

impl Series {
    pub(super) fn attributes(&self) -> impl Iterator<Item = (&'static str, Value)> + '_ {
        let provider = self.provider.map(|(k, v)| (k, Value::from(v)));
        [("gen_ai.operation.name", Value::from(self.operation))]
            .into_iter()
            .chain(provider)
            .chain(
                (!self.model.is_empty())
                    .then(|| ("gen_ai.request.model", Value::from(self.model.clone()))),
            )
            .chain(
                self.error
                    .as_ref()
                    .map(|e| ("error.type", Value::from(e.clone()))),
            )
            .chain(
                self.token_type
                    .map(|t| ("gen_ai.token.type", Value::from(t))),
            )
    }
}

/// One series' histogram.
#[derive(Debug, Clone, PartialEq)]
struct Point {
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
    /// One more than the boundaries: bucket `i` holds values in
    /// `(bounds[i-1], bounds[i]]`.
    buckets: Vec<u64>,
}

impl Point {
    fn new(buckets: usize) -> Point {
        Point {
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            buckets: vec![0; buckets],
        }
    }

    fn add(&mut self, value: f64, bounds: &[f64]) {
        self.count += 1;
        self.sum += value;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        self.buckets[bounds.partition_point(|b| *b < value)] += 1;
    }
}

/// The points of every instrument since the start (cumulative), or since
/// the last export (delta).
#[derive(Debug)]
pub(super) struct Histograms {
    points: [Mutex<FxHashMap<Series, Point>>; 4],
    /// The start of the points' time window.
    since: Mutex<SystemTime>,
    delta: bool,
}

impl Histograms {
    /// Empty histograms, cumulative from `start` or (`delta`) reset at each export.
    pub(super) fn new(start: SystemTime, delta: bool) -> Histograms {
        Histograms {
            points: Default::default(),
            since: Mutex::new(start),
            delta,
        }
    }

    /// Adds `value` to `series` of `instrument`. A value that is not a
    /// number is left out.
    pub(super) fn record(&self, instrument: Instrument, series: &Series, value: f64) {
        if value.is_nan() {
            return;
        }
        let bounds = SPECS[instrument as usize].bounds;
        let mut points = lock(&self.points[instrument as usize]);
        if let Some(point) = points.get_mut(series) {
            point.add(value, bounds);
            return;
        }
        let mut point = Point::new(bounds.len() + 1);
        point.add(value, bounds);
        points.insert(series.clone(), point);
    }

    /// The points as an `ExportMetricsServiceRequest` at `now` (`None`: no
    /// point yet); a delta export starts the next window.
    pub(super) fn export_request(
        &self,
        resource: &EncodedResource,
        now: SystemTime,
    ) -> Option<Vec<u8>> {
        let mut taken = Vec::with_capacity(4);
        for (i, points) in self.points.iter().enumerate() {
            let mut points = lock(points);
            if points.is_empty() {
                continue;
            }
            let points: Vec<(Series, Point)> = if self.delta {
                std::mem::take(&mut *points).into_iter().collect()
            } else {
                points.iter().map(|(s, p)| (s.clone(), p.clone())).collect()
            };
            taken.push((&SPECS[i], points));
        }
        let start = {
            let mut since = lock(&self.since);
            let start = *since;
            if self.delta {
                *since = now;
            }
            start
        };
        if taken.is_empty() {
            return None;
        }
        // AggregationTemporality: 1 delta, 2 cumulative.
        let temporality = if self.delta { 1 } else { 2 };
        let mut out = Vec::with_capacity(1024);
        message(&mut out, 1, |b| {
            message(b, 1, |b| b.extend_from_slice(resource.body()));
            message(b, 2, |b| {
                message(b, 1, |b| string(b, 1, super::SCOPE));
                for (spec, points) in &taken {
                    message(b, 2, |b| {
                        string(b, 1, spec.name);
                        string(b, 2, spec.description);
                        string(b, 3, spec.unit);
                        message(b, 9, |b| {
                            for (series, point) in points {
                                message(b, 1, |b| {
                                    data_point(b, spec.bounds, series, point, (start, now))
                                });
                            }
                            uint(b, 2, temporality);
                        });
                    });
                }
            });
            string(b, 3, resource.schema_url());
        });
        Some(out)
    }
}

/// A `HistogramDataPoint`'s fields.
fn data_point(
    b: &mut Vec<u8>,
    bounds: &[f64],
    series: &Series,
    point: &Point,
    (start, now): (SystemTime, SystemTime),
) {
    fixed64(b, 2, super::otlp::nanos(start));
    fixed64(b, 3, super::otlp::nanos(now));
    fixed64(b, 4, point.count);
    // `sum`, `min` and `max` are optional: present even when 0.
    double(b, 5, point.sum);
    packed64(b, 6, point.buckets.iter().map(|v| v.to_le_bytes()));
    packed64(b, 7, bounds.iter().map(|v| v.to_le_bytes()));
    for (key, value) in series.attributes() {
        attribute(b, 9, key, &value);
    }
    double(b, 11, point.min);
    double(b, 12, point.max);
}

#[cfg(test)]
mod tests;
