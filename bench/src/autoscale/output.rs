//! Per-second CSV and SVG charts of a run.

use std::fmt::Write as _;

use super::world::Row;

/// `second,demand_rps,capacity_rps,desired,instances,ready,cpu_percent,violation`.
pub fn csv(rows: &[Row], capacity_rps: f64) -> String {
    let mut text = String::with_capacity(rows.len() * 40);
    text.push_str("second,demand_rps,capacity_rps,desired,instances,ready,cpu_percent,violation\n");
    for (second, row) in rows.iter().enumerate() {
        let capacity = f64::from(row.ready) * capacity_rps;
        let _ = writeln!(
            text,
            "{second},{:.1},{capacity:.1},{},{},{},{:.1},{}",
            row.demand_rps,
            row.desired,
            row.instances,
            row.ready,
            row.cpu_percent,
            u8::from(row.demand_rps > capacity)
        );
    }
    text
}

const WIDTH: f64 = 1200.0;
const HEIGHT: f64 = 420.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;

/// A chart of demand (in instances' worth of capacity), ready capacity and instance count over
/// time, with the seconds in violation marked below the axis. Long runs are drawn per column:
/// the highest demand and instance count and the lowest ready capacity of the seconds the
/// column covers, so no spike or dip disappears.
pub fn svg(title: &str, rows: &[Row], capacity_rps: f64) -> String {
    let plot_width = WIDTH - LEFT - RIGHT;
    let plot_height = HEIGHT - TOP - BOTTOM;
    let columns = (plot_width as usize).min(rows.len()).max(1);
    let per_column = rows.len().div_ceil(columns).max(1);
    struct Column {
        demand: f64,
        ready: f64,
        instances: f64,
        violation: bool,
    }
    let buckets: Vec<Column> = rows
        .chunks(per_column)
        .map(|chunk| Column {
            demand: chunk
                .iter()
                .map(|r| r.demand_rps / capacity_rps)
                .fold(0.0, f64::max),
            ready: chunk
                .iter()
                .map(|r| f64::from(r.ready))
                .fold(f64::INFINITY, f64::min),
            instances: chunk
                .iter()
                .map(|r| f64::from(r.instances))
                .fold(0.0, f64::max),
            violation: chunk
                .iter()
                .any(|r| r.demand_rps > f64::from(r.ready) * capacity_rps),
        })
        .collect();
    let top = buckets
        .iter()
        .map(|b| b.demand.max(b.instances))
        .fold(1.0, f64::max)
        * 1.1;
    let x = |i: usize| LEFT + plot_width * i as f64 / buckets.len().max(1) as f64;
    let y = |v: f64| TOP + plot_height * (1.0 - v / top);
    let line = |pick: &dyn Fn(&Column) -> f64| {
        let mut points = String::new();
        for (i, bucket) in buckets.iter().enumerate() {
            let _ = write!(points, "{:.1},{:.1} ", x(i), y(pick(bucket)));
        }
        points
    };

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/><text x="{LEFT}" y="24" font-size="15">{}</text>"#,
        escape(title)
    );
    let _ = writeln!(
        svg,
        r#"<text x="14" y="{:.1}" transform="rotate(-90 14 {:.1})" text-anchor="middle">instances</text>"#,
        TOP + (HEIGHT - TOP - BOTTOM) / 2.0,
        TOP + (HEIGHT - TOP - BOTTOM) / 2.0
    );
    // Axes and a few gridlines in instances.
    let step = nice_step(top / 5.0);
    let mut value = 0.0;
    while value <= top {
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{value}</text>"##,
            WIDTH - RIGHT,
            LEFT - 6.0,
            y(value) + 4.0,
            y = y(value)
        );
        value += step;
    }
    let seconds = rows.len();
    for tick in 0..=5 {
        let second = seconds * tick / 5;
        let tx = LEFT + plot_width * tick as f64 / 5.0;
        let _ = writeln!(
            svg,
            r#"<text x="{tx:.1}" y="{:.1}" text-anchor="middle">{second} s</text>"#,
            HEIGHT - BOTTOM + 18.0
        );
    }
    // Violations as a red band under the plot.
    for (i, bucket) in buckets.iter().enumerate() {
        if bucket.violation {
            let _ = writeln!(
                svg,
                r##"<rect x="{:.1}" y="{:.1}" width="{:.2}" height="6" fill="#d62728"/>"##,
                x(i),
                HEIGHT - BOTTOM + 2.0,
                (x(i + 1) - x(i)).max(0.5)
            );
        }
    }
    type Pick<'a> = &'a dyn Fn(&Column) -> f64;
    let lines: [(&str, f64, Pick<'_>); 3] = [
        ("#7f7f7f", 1.0, &|b: &Column| b.demand),
        ("#1f77b4", 1.5, &|b: &Column| b.instances),
        ("#2ca02c", 1.5, &|b: &Column| b.ready),
    ];
    for (color, width, pick) in lines {
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="{width}" points="{}"/>"#,
            line(pick)
        );
    }
    let legend = [
        ("#7f7f7f", "demand (instances at 100%)"),
        ("#1f77b4", "instances"),
        ("#2ca02c", "ready"),
        ("#d62728", "SLO violation"),
    ];
    for (i, (color, label)) in legend.iter().enumerate() {
        let lx = LEFT + 190.0 * i as f64;
        let _ = writeln!(
            svg,
            r#"<rect x="{lx:.1}" y="{:.1}" width="14" height="4" fill="{color}"/><text x="{:.1}" y="{:.1}">{label}</text>"#,
            HEIGHT - 16.0,
            lx + 18.0,
            HEIGHT - 10.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn nice_step(rough: f64) -> f64 {
    let magnitude = 10f64.powf(rough.max(1e-9).log10().floor());
    let normalized = rough / magnitude;
    let nice = if normalized <= 1.0 {
        1.0
    } else if normalized <= 2.0 {
        2.0
    } else if normalized <= 5.0 {
        5.0
    } else {
        10.0
    };
    (nice * magnitude).max(1.0)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows() -> Vec<Row> {
        (0..5000)
            .map(|second| Row {
                demand_rps: if second == 2500 { 900.0 } else { 200.0 },
                desired: 4,
                instances: 4,
                ready: if second == 2500 { 3 } else { 4 },
                cpu_percent: 50.0,
            })
            .collect()
    }

    #[test]
    fn csv_has_a_row_per_second_and_marks_violations() {
        let text = csv(&rows(), 100.0);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5001);
        assert_eq!(lines[1], "0,200.0,400.0,4,4,4,50.0,0");
        assert_eq!(lines[2501], "2500,900.0,300.0,4,4,3,50.0,1");
    }

    #[test]
    fn svg_keeps_a_one_second_spike_in_a_long_run() {
        let chart = svg("spike <hpa>", &rows(), 100.0);
        assert!(chart.starts_with("<svg"));
        assert!(chart.trim_end().ends_with("</svg>"));
        assert!(chart.contains("spike &lt;hpa&gt;"));
        // One violation column, and the demand line reaches the spike's 9 instances.
        assert_eq!(chart.matches(r##"fill="#d62728"/>"##).count(), 2);
        assert_eq!(chart.matches("<polyline").count(), 3);
        let top = y_of(9.0, 9.0 * 1.1);
        assert!(chart.contains(&format!(",{top:.1} ")), "{top}");
    }

    fn y_of(value: f64, top: f64) -> f64 {
        TOP + (HEIGHT - TOP - BOTTOM) * (1.0 - value / top)
    }
}
